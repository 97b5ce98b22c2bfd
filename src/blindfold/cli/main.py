"""`blindfold <command>`: edge, origin, decisions, purge, check-config, demo...
`main(argv)` returns the exit code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blindfold import __version__
from blindfold.config import load_file
from blindfold.config.common import load_admin_token, unspecified_listen
from blindfold.errors import ConfigError


def _count(n: int, noun: str) -> str:
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun[:-1]}ies" if noun.endswith("y") else f"{n} {noun}s"


def _check_config(path: str) -> int:
    """Validate `path` as each process would at start: exit 2 naming the key on an error; print
    warnings (valid but probably unintended: an admin listener on every address...) to stderr
    and still exit 0."""
    warnings: list[str] = []
    try:
        config, _text = load_file(path)
        from blindfold.blind.exposure import check_deployment

        check_deployment(config)  # the manifest never where the edge ends TLS
        sections = []
        for name in ("edge", "origin", "keyserver"):  # the admin tokens read
            section = getattr(config, name)
            if section is not None:
                load_admin_token(section.admin_token_file, f"{name}.admin_token_file")
        if config.edge is not None:
            if unspecified_listen(config.edge.admin_listen):
                warnings.append(
                    f"edge.admin_listen = {config.edge.admin_listen!r} serves /metrics to every "
                    "network; bind it to 127.0.0.1 or an internal address"
                )
            from blindfold.edge.lists import ListSet

            edge = config.edge
            ListSet("blocklist", "blocklist_files", edge.blocklist_files, edge.block, strict=True)
            ListSet("allowlist", "allowlist_files", edge.allowlist_files, edge.allow, strict=True)
            from blindfold.core.proxyproto import load_auth_key
            from blindfold.edge.modes import check_route

            pending: set[str] = set()
            if edge.acme is not None:
                from blindfold.acme.certfiles import pending_files
                from blindfold.acme.check import check_acme

                check_acme(edge.acme, "edge.acme")
                pending = pending_files(edge.acme.orders)  # made at the first start
            for i, rc in enumerate(edge.routes):  # each mode's files: certificates, keys, CAs
                try:
                    if rc.proxy_auth_key_file:  # the PROXY header authentication key
                        load_auth_key(
                            rc.proxy_auth_key_file, f"edge.routes[{i}].proxy_auth_key_file"
                        )
                    if {rc.certificate, rc.key} & pending:
                        continue
                    check_route(f"edge.routes[{i}]", rc, edge)
                except ConfigError as exc:
                    if not rc.name or exc.where:
                        raise
                    raise ConfigError(
                        exc.key, exc.message, f"(route {json.dumps(rc.name)})"
                    ) from None
            if edge.decisions is not None:  # the origins' public keys for signed decisions
                from blindfold.decisions.signed import load_public_key

                for i, path in enumerate(edge.decisions.signer_public_keys):
                    load_public_key(path, f"edge.decisions.signer_public_keys[{i}]")
            sections.append(
                f"edge ({_count(len(edge.routes), 'route')}, "
                f"{_count(len(edge.listen), 'listener')})"
            )
        if config.origin is not None:
            from blindfold.config.origin import listen_warnings
            from blindfold.origin.agent import build_waf
            from blindfold.origin.edges import TrustedEdges
            from blindfold.origin.tls import SiteTls, decisions_tls

            origin = config.origin
            TrustedEdges(origin)  # the edges' PROXY authentication keys load
            if origin.acme is not None:
                from blindfold.acme.check import check_acme

                check_acme(origin.acme, "origin.acme")
            if origin.certificates:
                SiteTls(origin.certificates)
            if origin.decisions.listen:
                from blindfold.decisions.api import load_api_keys

                edge_keys = load_api_keys(origin.decisions.api_keys_file)
                if origin.decisions.operator_keys_file:  # present, private, well formed
                    from blindfold.decisions.operator import load_operator_keys

                    load_operator_keys(
                        origin.decisions.operator_keys_file,
                        origin.decisions.api_keys_file,
                        edge_keys,
                    )
                decisions_tls(origin)  # loads, and names none of the site's names
            warnings += listen_warnings(origin)
            if origin.decisions.signing_key:
                from blindfold.decisions.signed import load_private_key

                load_private_key(origin.decisions.signing_key, "origin.decisions.signing_key")
            build_waf(origin)
            if origin.blind is not None:  # its keys and the sealed store's public key load
                from blindfold.origin.blindstore import BlindStore

                BlindStore(origin.blind, {}, lambda *a, **k: None)
            waf = f"PL{origin.waf.paranoia_level}" if origin.waf.enabled else "off"
            sections.append(f"origin (upstream {origin.upstream}, WAF {waf})")
        if config.keyserver is not None:
            from blindfold.keyserver.access import check_keys

            ks = config.keyserver
            if ks.acme is not None:
                import dataclasses

                from blindfold.acme.certfiles import pending_files
                from blindfold.acme.check import check_acme

                check_acme(ks.acme, "keyserver.acme")
                # keys ACME makes at the first start are not there yet: check the others
                pending = pending_files(ks.acme.orders)
                ready = tuple(k for k in ks.keys if not {k.key, k.certificate} & pending)
                ks = dataclasses.replace(ks, keys=ready) if ready else None  # type: ignore[assignment]
            if ks is not None:
                warnings += check_keys(ks)  # loads the keys; partly authorised edges
            if unspecified_listen(config.keyserver.admin_listen):
                warnings.append(
                    f"keyserver.admin_listen = {config.keyserver.admin_listen!r} serves /metrics "
                    "to every network; bind it to 127.0.0.1 or an internal address"
                )
            sections.append(
                f"keyserver ({_count(len(config.keyserver.keys), 'key')}, "
                f"{_count(len(config.keyserver.edges), 'edge')})"
            )
        if not sections:
            raise ConfigError(
                "", f"{path} has no known section (expected [edge], [origin] or [keyserver])"
            )
    except ConfigError as exc:
        message = str(exc)  # a syntax error names the file itself
        print(message if message.startswith(f"{path}:") else f"{path}: {message}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"{path}: warning: {warning}", file=sys.stderr)
    print(f"{path}: ok: " + ", ".join(sections))
    return 0


def _seal(args: argparse.Namespace) -> int:
    from blindfold.blind.sealer import SealOptions, load_id_secret, load_signing_key, seal_tree

    src = Path(args.src).resolve()
    for flag, path in (("--signing-key", args.signing_key), ("--id-secret", args.id_secret)):
        if Path(path).resolve().is_relative_to(src):
            print(
                f"blindfold seal: {flag} {path} is inside {args.src}: it would be published",
                file=sys.stderr,
            )
            return 2
    try:
        key = load_signing_key(args.signing_key, create=args.create_keys)
        secret = load_id_secret(args.id_secret, create=args.create_keys)
        report = seal_tree(
            args.src,
            args.out,
            key,
            secret,
            SealOptions(
                record_size=args.record_size,
                buckets=args.buckets,
                expires_in_s=int(args.expires_in),
                skip=tuple(args.skip),
                sri=tuple(args.sri),
                private=tuple(args.private),
                rotate_private=args.rotate_private,
                make_public=args.make_public,
            ),
        )
    except ConfigError as exc:
        print(f"blindfold seal: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"blindfold seal: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"sealed {args.src} -> {args.out}: {report.line()}")
    return 0


def _connect_to(items: list[str]) -> dict[str, str]:
    connect_to = {}
    for item in items:
        host, port, addr_port = [*item.split(":", 2), "", ""][:3]
        if not (
            host
            and port.isascii()
            and port.isdigit()
            and ":" in addr_port
            and addr_port.rpartition(":")[2].isascii()
            and addr_port.rpartition(":")[2].isdigit()
        ):
            raise ConfigError("connect_to", f"{item!r}: expected HOST:PORT:ADDR:PORT")
        connect_to[f"{host}:{port}"] = addr_port
    return connect_to


def _headers(items: list[str]) -> tuple[tuple[str, str], ...]:
    """`Name: value` request headers (credentials for the origin), checked for what
    http.client would send as is: a token for a name, no CR/LF in either."""
    out = []
    for item in items:
        name, sep, value = item.partition(":")
        name, value = name.strip(), value.strip()
        token = name and all(c.isascii() and (c.isalnum() or c in "!#$%&'*+-.^_`|~") for c in name)
        if not sep or not token or any(c in value for c in "\r\n\x00"):
            raise ConfigError("header", f"{item!r}: expected 'Name: value'")
        out.append((name, value))
    return tuple(out)


def _verify(args: argparse.Namespace) -> int:
    from blindfold.blind.fetch import load_public_key
    from blindfold.blind.verify import VerifyOptions, cert_pins, verify_site

    try:
        opts = VerifyOptions(
            ca_file=args.cacert,
            connect_to=_connect_to(args.connect_to),
            timeout_s=args.timeout,
            pins_sha256=cert_pins(args.pin, args.expect_cert),
            signature_key=load_public_key(args.signature_key) if args.signature_key else None,
            manifest_key=load_public_key(args.manifest_key) if args.manifest_key else None,
            edge=args.edge,
            max_blobs=args.max_blobs,
        )
        checks = verify_site(args.url, opts)
    except ConfigError as exc:
        print(f"blindfold verify: {exc}", file=sys.stderr)
        return 2
    for check in checks:
        print(check.line())
    return 0 if all(c.ok for c in checks) else 1


def _fetch(args: argparse.Namespace) -> int:
    from blindfold.blind.fetch import FetchOptions, fetch, load_public_key
    from blindfold.errors import UpstreamError, VerificationError

    try:
        connect_to = _connect_to(args.connect_to)
        _headers(args.header)
    except ConfigError as exc:
        print(f"blindfold fetch: {exc}", file=sys.stderr)
        return 2
    try:
        opts = FetchOptions(
            edge=args.edge,
            public_key=load_public_key(args.manifest_key),
            manifest_url=args.manifest_url,
            ca_file=args.cacert,
            connect_to=connect_to,
            timeout_s=args.timeout,
            fallback=not args.no_fallback,
            plaintext_path=args.plaintext_path,
            headers=_headers(args.header),
        )
        result = fetch(args.url, args.output, opts)
    except ConfigError as exc:
        print(f"blindfold fetch: {exc}", file=sys.stderr)
        return 2
    except (VerificationError, UpstreamError) as exc:
        print(f"blindfold fetch: {args.url}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the output file, the CA bundle
        print(f"blindfold fetch: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if result.edge_error:
        print(
            f"blindfold fetch: edge copy not used: {result.edge_error}; fetched from the "
            "origin instead" + ("; reported to the edge" if result.reported else ""),
            file=sys.stderr,
        )
    print(
        f"{args.output}: {result.size} bytes from the {result.source}, sha256 "
        f"{result.sha256} verified ({result.seconds:.2f} s)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="blindfold",
        description="An edge network that never holds the site's TLS key. The three daemons "
        "(edge, origin, keyserver) read one TOML file each (or one file with several "
        "sections); `blindfold COMMAND --help` describes each command. README.md walks a "
        "first site step by step.",
    )
    parser.add_argument("--version", action="version", version=f"blindfold {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_edge = sub.add_parser(
        "edge",
        help="run an edge: passthrough, keyless and blind routes (SIGHUP reloads, SIGTERM "
        "drains and stops)",
    )
    p_edge.add_argument("--config", "-c", required=True, help="TOML configuration file")

    p_origin = sub.add_parser(
        "origin",
        help="run the origin agent: TLS with the site's keys, WAF, decisions, the sealed "
        "store (SIGHUP reloads, SIGTERM stops)",
    )
    p_origin.add_argument("--config", "-c", required=True, help="TOML configuration file")

    p_ks = sub.add_parser(
        "keyserver",
        help="run the key server: keyless TLS signatures for authorised edges, audit log "
        "(SIGHUP reloads, SIGTERM stops)",
    )
    p_ks.add_argument("--config", "-c", required=True, help="TOML configuration file")

    p_audit = sub.add_parser(
        "audit",
        help="check a key server audit log",
        description="Verify the key server's hash-chained, keyed audit log: exit 0 when every "
        "line verifies, 1 at the first bad line (named), 2 when the key or the log cannot be "
        "read.",
    )
    p_audit.add_argument("action", choices=["verify"], help="what to do (only: verify)")
    p_audit.add_argument(
        "--key", required=True, help="the audit key file (keyserver.audit_key)", metavar="KEY"
    )
    p_audit.add_argument("file", help="the audit log (keyserver.audit_log)")

    from blindfold.cli import pki as pki_cli

    pki_cli.add_parser(sub)

    from blindfold.cli import waf as waf_cli

    waf_cli.add_parser(sub)

    from blindfold.cli import operator as operator_cli

    operator_cli.add_parsers(sub)

    p_seal = sub.add_parser("seal", help="seal a static tree for blind delivery")
    p_seal.add_argument("src", metavar="SRC_DIR")
    p_seal.add_argument("out", metavar="OUT_DIR")
    p_seal.add_argument(
        "--signing-key", required=True, help="the site's Ed25519 manifest key (PEM, PKCS#8)"
    )
    p_seal.add_argument(
        "--id-secret",
        required=True,
        help="file with the secret (hex, >= 32 bytes) that names blobs",
    )
    p_seal.add_argument(
        "--create-keys",
        action="store_true",
        help="create the signing key and the id secret if they are missing",
    )
    p_seal.add_argument(
        "--record-size",
        type=int,
        default=65536,
        help="RFC 8188 record size in bytes (default 65536)",
    )
    p_seal.add_argument(
        "--buckets",
        choices=["padme", "none"],
        default="padme",
        help="pad sealed sizes to Padmé buckets (default) or not at all",
    )
    p_seal.add_argument(
        "--expires-in",
        type=float,
        default=7 * 86400,
        help="manifest lifetime in seconds (default 7 days)",
    )
    p_seal.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave files matching GLOB (on /path or name) unsealed, e.g. "
        "'*.html' for the pages the origin serves itself; repeatable",
    )
    p_seal.add_argument(
        "--sri",
        action="append",
        default=[],
        metavar="GLOB",
        help="also publish matching scripts/stylesheets in plaintext for "
        "Subresource Integrity (browsers without service workers; the edge "
        "can read these copies); repeatable",
    )

    p_seal.add_argument(
        "--private",
        action="append",
        default=[],
        metavar="GLOB",
        help="seal matching files as private: their entries go to manifest-private.json, "
        "which the origin serves only to visitors its application admits "
        "([origin.blind] private_auth_path); repeatable",
    )
    p_seal.add_argument(
        "--rotate-private",
        action="store_true",
        help="give every private file a new key and id and remove the old private blobs "
        "(revocation: old keys open nothing sealed from now on)",
    )

    p_seal.add_argument(
        "--make-public",
        action="store_true",
        help="allow this seal to make public files the last seal kept private (a --private "
        "pattern dropped); without it such a seal is refused (exit 2)",
    )

    p_fetch = sub.add_parser(
        "fetch",
        help="fetch a sealed file: manifest from the origin, "
        "blob from the edge, verified and decrypted",
    )
    p_fetch.add_argument("url", help="https URL of the file at the origin")
    p_fetch.add_argument(
        "--edge", required=True, help="base URL of the blind edge (blobs at EDGE/b/<id>)"
    )
    p_fetch.add_argument(
        "--manifest-key", required=True, help="the site's manifest public key (PEM)"
    )
    p_fetch.add_argument(
        "--manifest-url",
        default="",
        help="default: the URL's origin + /.well-known/blindfold/manifest.json",
    )
    p_fetch.add_argument(
        "--plaintext-path",
        default="/.well-known/blindfold/plain/",
        help="the origin's prefix for the plaintext of sealed files (the fallback; "
        "[origin.blind] plaintext_path)",
    )
    p_fetch.add_argument(
        "--header",
        "-H",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a request header for the origin (credentials for private files: Cookie, "
        "Authorization); never sent to the edge; repeatable",
    )
    p_fetch.add_argument("--cacert", help="CA bundle for the origin and the edge")
    p_fetch.add_argument(
        "--connect-to",
        action="append",
        default=[],
        metavar="HOST:PORT:ADDR:PORT",
        help="connect to ADDR:PORT for HOST:PORT (like curl --connect-to)",
    )
    p_fetch.add_argument(
        "--no-fallback",
        action="store_true",
        help="fail instead of fetching from the origin when the edge copy fails",
    )
    p_fetch.add_argument("-o", "--output", required=True, help="where to write the file")
    p_fetch.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per request (default: %(default)s)"
    )

    p_verify = sub.add_parser(
        "verify",
        help="check a site end to end through an edge: "
        "certificate, response signature, manifest, blob digests",
    )
    p_verify.add_argument("url", help="https URL of a page of the site")
    p_verify.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="SHA256",
        help="expected leaf certificate fingerprint (hex); repeatable",
    )
    p_verify.add_argument(
        "--expect-cert",
        action="append",
        default=[],
        metavar="PEM",
        help="expected leaf certificate (its fingerprint is a pin)",
    )
    p_verify.add_argument(
        "--signature-key",
        help="the site's response-signing public key "
        "(PEM): the response must carry a valid RFC 9421 signature",
    )
    p_verify.add_argument("--manifest-key", help="the site's manifest public key (PEM)")
    p_verify.add_argument("--edge", default="", help="blind edge base URL: check every blob")
    p_verify.add_argument(
        "--max-blobs",
        type=int,
        default=1000,
        help="check at most this many blobs (default: %(default)s)",
    )
    p_verify.add_argument(
        "--cacert", help="CA bundle for the site and the edge (default: the system's)"
    )
    p_verify.add_argument(
        "--connect-to",
        action="append",
        default=[],
        metavar="HOST:PORT:ADDR:PORT",
        help="connect to ADDR:PORT for HOST:PORT (like curl --connect-to); repeatable",
    )
    p_verify.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per request (default: %(default)s)"
    )

    p_check = sub.add_parser(
        "check-config",
        help="validate a configuration file (exit 0 valid, 2 invalid)",
        description="Load FILE as each daemon would at start (its keys, certificates, lists "
        "and rules too). Exit 0 when it is valid (warnings go to stderr), 2 naming the key "
        "and the fix when it is not.",
    )
    p_check.add_argument("file", help="the TOML configuration file")

    p_demo = sub.add_parser("demo", help="run the whole topology on loopback")
    p_demo.add_argument("--port", type=int, default=8443, help="edge port (default 8443)")
    p_demo.add_argument(
        "--admin-port", type=int, default=7743, help="edge admin port (default 7743)"
    )
    p_demo.add_argument("--dir", help="keep the generated files here")
    p_demo.add_argument("--duration", type=float, help="stop after this many seconds")
    p_demo.add_argument(
        "--self-check",
        action="store_true",
        help="run the demo's checks, then exit: 0 if all pass, 1 if not "
        "(with --duration: keep running that long first)",
    )
    p_demo.add_argument(
        "--acme",
        action="store_true",
        help="also run a local ACME CA (Debian's pebble) and give one hostname a "
        "certificate from it by tls-alpn-01 through the edge",
    )

    args = parser.parse_args(argv)
    if args.command == "edge":
        from blindfold.edge.master import run_edge

        return run_edge(args.config)
    if args.command == "origin":
        from blindfold.origin.master import run_origin_master as run_origin

        return run_origin(args.config)
    if args.command == "keyserver":
        from blindfold.keyserver.server import run_keyserver

        return run_keyserver(args.config)
    if args.command == "audit":
        from blindfold.keyserver.audit import AuditError, load_key, verify

        try:
            result = verify(args.file, load_key(args.key))
        except AuditError as exc:
            print(f"blindfold audit: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"{args.file}: {exc.strerror}", file=sys.stderr)
            return 2
        if not result.ok:
            print(
                f"{args.file}: BROKEN at line {result.line}: {result.problem} "
                f"({result.entries} entries verify before it)"
            )
            return 1
        print(f"{args.file}: ok: {_count(result.entries, 'entry')}, last mac {result.last_mac}")
        if result.partial_tail:
            print(
                f"{args.file}: and a partial last line of {result.partial_tail} bytes (a write "
                "cut short, never acknowledged): the key server cuts it at its next start"
            )
        return 0
    if args.command == "pki":
        return pki_cli.run(args)
    if args.command == "waf":
        return waf_cli.run(args)
    if args.command == "decisions":
        return operator_cli.run_decisions(args)
    if args.command == "purge":
        return operator_cli.run_purge(args)
    if args.command == "seal":
        return _seal(args)
    if args.command == "fetch":
        return _fetch(args)
    if args.command == "verify":
        return _verify(args)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "demo":
        from blindfold.demo.run import run_demo

        return run_demo(
            args.port, args.admin_port, args.dir, args.duration, args.self_check, args.acme
        )
    parser.error(f"unknown command {args.command}")
    return 2


def entry() -> None:
    sys.exit(main())
