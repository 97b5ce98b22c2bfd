"""CPU the edge spends to classify one new QUIC flow (sans-IO, no sockets): the client's
first-flight datagrams through `QuicFlowTable.from_client` until `HelloReceived`, then
`accept`. Real datagrams from tests/data/quic. Prints microseconds per flow.

    .venv/bin/python bench/quic/flow_cost.py [N]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from blindfold.core.quic_flows import HelloReceived, QuicFlowTable

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "quic"


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    for name in ("aioquic_v1", "qh3_v1", "chromium_v1", "chromium_v2"):
        grams = [
            bytes.fromhex(x) for x in json.loads((DATA / f"{name}.json").read_text())["datagrams"]
        ]
        table = QuicFlowTable()
        t0 = time.process_time()
        for i in range(n):
            src = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 40000)
            for g in grams:
                r = table.from_client(g, src, float(i))
                if isinstance(r, HelloReceived):
                    table.accept(r.flow, float(i))
                    break
            table.end(r.flow, "bench")  # type: ignore[union-attr]
        cpu = time.process_time() - t0
        print(f"{name:12s} {1e6 * cpu / n:8.1f} us CPU per new flow ({n} flows)")


if __name__ == "__main__":
    main()
