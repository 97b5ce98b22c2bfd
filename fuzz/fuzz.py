"""Coverage-guided fuzzing of one target of fuzz/targets.py with atheris (libFuzzer).

    python fuzz/fuzz.py TARGET [libFuzzer options] [CORPUS_DIR ...]

fuzz/run.sh is the usual way in: it gives the seed corpus, a time budget and where crashes go.
blindfold's modules are instrumented for coverage as they are imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["blindfold", "fuzz"]):
    from fuzz import targets


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        names = ", ".join(targets.TARGETS)
        sys.exit(f"usage: fuzz.py TARGET [libFuzzer options]; targets: {names}")
    name = sys.argv.pop(1)
    # import what the target imports lazily now, under instrumentation
    with atheris.instrument_imports(include=["blindfold"]):
        try:
            targets.check(name, b"")
        except Exception:  # warm-up only: the fuzzer reports real failures
            pass
        import blindfold.config
        import blindfold.core.clienthello
        import blindfold.core.ece
        import blindfold.core.keyless_wire
        import blindfold.core.manifest
        import blindfold.core.proxyproto
        import blindfold.core.tls13_record
        import blindfold.core.tls13_server
        import blindfold.decisions.core
        import blindfold.decisions.feed
        import blindfold.decisions.redis_bus  # noqa: F401

    def one_input(data: bytes) -> None:
        targets.check(name, data)

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
