"""`blindfold waf report LOG...`: blocks by rule, path and argument, and exclusions to paste
into `[origin.waf]` (blindfold/waf/report.py says what is proposed and what is not)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("waf", help="summarise the origin's WAF blocks and propose exclusions")
    cmds = p.add_subparsers(dest="waf_command", required=True, metavar="WHAT")
    r = cmds.add_parser(
        "report",
        help="read WAF audit lines (the origin's log or [origin.waf] audit_log): blocks by "
        "rule, path and argument, and exclusions as TOML",
        description='Reads the origin agent\'s WAF audit lines (JSON, event "waf") and prints '
        "blocked requests by rule, path and argument, then [[origin.waf.exclusions]] entries "
        "(rule ids + path + argument names) that would stop those blocks. Requests on a "
        "'detect' path count when they would have been blocked. Exit codes: 0 done, 2 a file "
        "could not be read.",
    )
    r.add_argument("logs", nargs="+", metavar="LOG", help="log files (JSON lines)")
    r.add_argument(
        "--min-clients",
        type=int,
        default=2,
        help="propose only what blocked requests from at least this many client addresses "
        "(default 2: one address alone is more likely an attack than a false positive)",
    )
    r.add_argument(
        "--min-requests",
        type=int,
        default=1,
        help="... and at least this many requests (default 1)",
    )
    r.add_argument(
        "--attacks",
        metavar="LOG",
        action="append",
        default=[],
        help="audit lines of a replay of known attacks (repeatable): an exclusion that would "
        "let one of them through is not proposed, but listed",
    )
    r.add_argument(
        "--max-attacks-lost",
        type=int,
        default=0,
        metavar="N",
        help="with --attacks: how many of those attacks all proposals together may let "
        "through (default 0)",
    )
    r.add_argument(
        "--threshold",
        type=int,
        default=5,
        help="the CRS anomaly threshold the site runs ([origin.waf] anomaly_threshold; default 5)",
    )
    r.add_argument("--top", type=int, default=20, help="rows per summary table (default 20)")
    r.add_argument("--toml", action="store_true", help="print only the proposed exclusions (TOML)")


def run(args: argparse.Namespace) -> int:
    from blindfold.waf import report

    try:
        rep = report.read(args.logs)
        attacks = report.read(args.attacks) if args.attacks else None
    except OSError as exc:
        print(f"blindfold waf report: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    proposals, refused = report.propose(
        rep, args.min_requests, args.min_clients, attacks, args.threshold, args.max_attacks_lost
    )
    if args.toml:
        print(report.toml(proposals, rep.messages), end="")
    else:
        print(report.text(rep, proposals, refused, args.top, args.min_clients))
    return 0
