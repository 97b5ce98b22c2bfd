"""`blindfold <command>`: edge, check-config, demo. `main(argv)` returns the exit code."""

from __future__ import annotations

import argparse
import sys

from blindfold import __version__
from blindfold.config import load_file
from blindfold.errors import ConfigError


def _check_config(path: str) -> int:
    try:
        config, _text = load_file(path)
        sections = []
        if config.edge is not None:
            from blindfold.edge.lists import ListSet

            edge = config.edge
            ListSet("blocklist", "blocklist_files", edge.blocklist_files, edge.block, strict=True)
            ListSet("allowlist", "allowlist_files", edge.allowlist_files, edge.allow, strict=True)
            from blindfold.edge.keyless import KeylessRoute

            for i, rc in enumerate(edge.routes):
                if rc.mode == "keyless":  # the certificate, the key server and origin TLS files
                    KeylessRoute(f"edge.routes[{i}]", rc, {}, edge.ipv6_prefix_len)
            sections.append(f"edge ({len(edge.routes)} routes, {len(edge.listen)} listeners)")
        if config.origin is not None:
            from blindfold.origin.agent import build_waf
            from blindfold.origin.tls import SiteTls

            origin = config.origin
            if origin.certificates:
                SiteTls(origin.certificates)
            if origin.decisions.listen:
                from blindfold.decisions.api import load_api_keys

                load_api_keys(origin.decisions.api_keys_file)
            build_waf(origin)
            waf = f"PL{origin.waf.paranoia_level}" if origin.waf.enabled else "off"
            sections.append(f"origin (upstream {origin.upstream}, WAF {waf})")
        if config.keyserver is not None:
            from blindfold.keyserver.signer import load_key

            for i, k in enumerate(config.keyserver.keys):
                load_key(i, k)
            sections.append(f"keyserver ({len(config.keyserver.keys)} keys, "
                            f"{len(config.keyserver.edges)} edges)")
        if not sections:
            raise ConfigError("", f"{path} has no known section (expected [edge], [origin] "
                              "or [keyserver])")
    except ConfigError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    print(f"{path}: ok: " + ", ".join(sections))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="blindfold",
        description="An edge network that never holds the site's TLS key.")
    parser.add_argument("--version", action="version", version=f"blindfold {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_edge = sub.add_parser("edge", help="run an edge (passthrough and keyless routes)")
    p_edge.add_argument("--config", "-c", required=True, help="TOML configuration file")

    p_origin = sub.add_parser("origin", help="run the origin agent (TLS, WAF, decisions)")
    p_origin.add_argument("--config", "-c", required=True, help="TOML configuration file")

    p_ks = sub.add_parser("keyserver", help="run the key server (keyless TLS signatures)")
    p_ks.add_argument("--config", "-c", required=True, help="TOML configuration file")

    p_audit = sub.add_parser("audit", help="check a key server audit log")
    p_audit.add_argument("action", choices=["verify"])
    p_audit.add_argument("file")

    from blindfold.cli import pki as pki_cli

    pki_cli.add_parser(sub)

    p_check = sub.add_parser("check-config", help="validate a configuration file")
    p_check.add_argument("file")

    p_demo = sub.add_parser("demo", help="run the whole topology on loopback")
    p_demo.add_argument("--port", type=int, default=8443, help="edge port (default 8443)")
    p_demo.add_argument("--admin-port", type=int, default=9100,
                        help="edge admin port (default 9100)")
    p_demo.add_argument("--dir", help="keep the generated files here")
    p_demo.add_argument("--duration", type=float, help="stop after this many seconds")
    p_demo.add_argument("--self-check", action="store_true",
                        help="fetch the demo page through the edge and fail if it is wrong")

    args = parser.parse_args(argv)
    if args.command == "edge":
        from blindfold.edge.master import run_edge

        return run_edge(args.config)
    if args.command == "origin":
        from blindfold.origin.agent import run_origin

        return run_origin(args.config)
    if args.command == "keyserver":
        from blindfold.keyserver.server import run_keyserver

        return run_keyserver(args.config)
    if args.command == "audit":
        from blindfold.keyserver.audit import verify

        try:
            result = verify(args.file)
        except OSError as exc:
            print(f"{args.file}: {exc.strerror}", file=sys.stderr)
            return 2
        if result.ok:
            print(f"{args.file}: ok: {result.entries} entries, last hash {result.last_hash}")
            return 0
        print(f"{args.file}: BROKEN at line {result.line}: {result.problem} "
              f"({result.entries} entries verify before it)")
        return 1
    if args.command == "pki":
        return pki_cli.run(args)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "demo":
        from blindfold.demo.run import run_demo

        return run_demo(args.port, args.admin_port, args.dir, args.duration, args.self_check)
    parser.error(f"unknown command {args.command}")
    return 2


def entry() -> None:
    sys.exit(main())
