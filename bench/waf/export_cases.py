#!/usr/bin/env python3
"""Export the WAF kit's request cases (../shared/waf) as raw requests for
tests/integration/test_waf_tuning.py, which must run on a clean clone without the kit.

    python3 bench/waf/export_cases.py [--kit ../shared/waf] [--out tests/data/waf]

Writes attacks.jsonl.gz (the OWASP CRS 3.3.4 regression tests' attack cases at PL1 and
PayloadsAllTheThings) and benign.jsonl.gz (the CRS regression tests' benign cases and
libinjection's false-positive list): one JSON object per line, {"id", "suite", "expect",
"raw"} with the request bytes exactly as the kit's run_ftw.py sends them (base64). The
sources' licences are copied beside them (CRS: Apache-2.0; libinjection: BSD-3-Clause;
PayloadsAllTheThings: MIT).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import shutil
import sys
from pathlib import Path


def main() -> int:
    here = Path(__file__).resolve()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kit", default=str(here.parents[3] / "shared" / "waf"))
    ap.add_argument("--out", default=str(here.parents[2] / "tests" / "data" / "waf"))
    a = ap.parse_args()
    kit, out = Path(a.kit), Path(a.out)
    sys.path.insert(0, str(kit))
    import run_ftw  # type: ignore[import-not-found]

    plmap = json.loads((kit / "data" / "crs-tests" / "rule_paranoia.json").read_text())
    cases = run_ftw.load_crs(run_ftw.DEF_CRS, plmap, 1) + run_ftw.load_corpora(run_ftw.DEF_CORPORA)
    out.mkdir(parents=True, exist_ok=True)
    wanted = {
        "attacks": lambda c: (
            c.expect == "attack" and (c.suite == "crs" or c.suite == "corpora:attacks_patt")
        ),
        "benign": lambda c: c.expect == "benign",
    }
    for name, keep in wanted.items():
        rows = [
            {
                "id": c.cid,
                "suite": c.suite,
                "expect": c.expect,
                "raw": base64.b64encode(c.raw).decode(),
            }
            for c in cases
            if keep(c)
        ]
        with gzip.open(out / f"{name}.jsonl.gz", "wt", compresslevel=9) as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        print(f"{out / (name + '.jsonl.gz')}: {len(rows)} cases")
    shutil.copy(kit / "data" / "crs-tests" / "v3.3.4" / "LICENSE.CRS", out / "LICENSE.CRS")
    src = kit / "data" / "corpora" / "sources"
    shutil.copy(src / "libinjection" / "COPYING", out / "LICENSE.libinjection")
    for f in sorted((src / "patt").iterdir()):
        if f.name.upper().startswith("LICENSE"):
            shutil.copy(f, out / "LICENSE.PayloadsAllTheThings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
