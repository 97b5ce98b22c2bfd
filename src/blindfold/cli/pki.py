"""`blindfold pki`: the site's own small CA for key-server mutual TLS (and demo certificates).

    blindfold pki ca DIR                         # DIR/ca.pem, DIR/ca.key
    blindfold pki edge NAME DIR                  # DIR/NAME.pem, DIR/NAME.key: an edge's client cert
    blindfold pki server NAME DIR --host H ...   # a server certificate (the key server's)
The fingerprint printed for an edge goes into [[keyserver.edges]] cert_sha256. Keys are
written 0600; an existing key is never replaced without --force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from blindfold import pki


def _load_ca(directory: Path) -> pki.Issued:
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    return pki.Issued(key, cert)  # type: ignore[arg-type]


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("pki", help="make the site's CA and edge/key-server certificates")
    cmds = p.add_subparsers(dest="pki_command", required=True, metavar="WHAT")
    ca = cmds.add_parser("ca", help="a new CA in DIR")
    ca.add_argument("dir")
    ca.add_argument("--force", action="store_true", help="replace an existing CA")
    ca.add_argument("--name", default="blindfold site CA")
    ca.add_argument("--days", type=int, default=3650)
    edge = cmds.add_parser("edge", help="a client certificate for an edge, signed by DIR's CA")
    edge.add_argument("name")
    edge.add_argument("dir")
    edge.add_argument("--days", type=int, default=365)
    edge.add_argument("--force", action="store_true", help="replace an existing NAME.key")
    server = cmds.add_parser("server", help="a server certificate, signed by DIR's CA")
    server.add_argument("name")
    server.add_argument("dir")
    server.add_argument("--host", action="append", required=True, help="DNS name or IP")
    server.add_argument(
        "--key-type", default="ec256", choices=["ec256", "ec384", "rsa2048", "ed25519"]
    )
    server.add_argument("--days", type=int, default=365)
    server.add_argument("--force", action="store_true", help="replace an existing NAME.key")


def _refuse_overwrite(args: argparse.Namespace, *paths: Path) -> bool:
    """A key (or its certificate) already there is never replaced without --force: a
    re-run must not silently change a deployed identity."""
    if args.force:
        return False
    for path in paths:
        if path.exists():
            print(
                f"blindfold pki: {path} exists; not overwriting (--force replaces it)",
                file=sys.stderr,
            )
            return True
    return False


def run(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if args.pki_command == "ca":
        if _refuse_overwrite(args, directory / "ca.key", directory / "ca.pem"):
            return 2
        ca = pki.make_ca(args.name, days=args.days)
        ca.write(directory / "ca.pem", directory / "ca.key")
        print(f"CA: {directory / 'ca.pem'} (key {directory / 'ca.key'}, keep it offline)")
        return 0
    if _refuse_overwrite(args, directory / f"{args.name}.key", directory / f"{args.name}.pem"):
        return 2
    ca = _load_ca(directory)
    if args.pki_command == "edge":
        leaf = pki.issue(ca, [], client=True, server=False, common_name=args.name, days=args.days)
    else:
        leaf = pki.issue(ca, args.host, kind=args.key_type, days=args.days)
    leaf.write(directory / f"{args.name}.pem", directory / f"{args.name}.key")
    print(
        f"{args.pki_command} {args.name}: {directory / f'{args.name}.pem'} "
        f"(key {directory / f'{args.name}.key'})"
    )
    print(f'cert_sha256 = "{pki.fingerprint_sha256(leaf.cert)}"')
    return 0
