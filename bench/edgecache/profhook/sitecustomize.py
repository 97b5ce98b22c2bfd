"""bench/edgecache --profile: cProfile in every edge worker interpreter (python -m
blindfold.edge.worker) started with EDGECACHE_PROFILE=DIR in its environment; the stats are
written to DIR/worker-PID.prof when the worker exits (the edge's master stops it with SIGTERM,
and it drains and returns). Benchmarks only: never on the product's path."""

import os
import sys

_dir = os.environ.get("EDGECACHE_PROFILE")
if _dir and "blindfold.edge.worker" in getattr(sys, "orig_argv", ()):
    import atexit
    import cProfile

    _prof = cProfile.Profile()

    def _dump() -> None:
        _prof.disable()
        _prof.dump_stats(os.path.join(_dir, f"worker-{os.getpid()}.prof"))

    atexit.register(_dump)
    _prof.enable()
