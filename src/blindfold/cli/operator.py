"""`blindfold decisions` and `blindfold purge`: the operator's commands, against the origin's
decisions listener (decisions.operator), over verified TLS with an operator key.

    blindfold decisions list
    blindfold decisions add --ip 192.0.2.7 --duration 4h --reason "scraper"
    blindfold decisions add --range 198.51.100.0/24 --duration 30m
    blindfold decisions delete --ip 192.0.2.7        (or --range CIDR, --id N)
    blindfold purge --url https://example.com/a.css --prefix https://example.com/img/ \\
                    --tag product-42 --blob 0123...ef

Where and how: --origin (or BLINDFOLD_OPERATOR_URL), the listener's https://HOST:PORT; --ca
(its CA; the system's when omitted); --server-name (the name in its certificate); --key-file
(or BLINDFOLD_OPERATOR_KEY_FILE): a file holding 'id:secret' or the secret alone. Exit 0 when
done, 1 when the origin refused or could not be reached, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

TIMEOUT_S = 10.0
MAX_ANSWER_BYTES = 64 << 20


class OperatorError(Exception):
    pass


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--origin",
        default=os.environ.get("BLINDFOLD_OPERATOR_URL", ""),
        help="the origin's decisions listener, https://HOST:PORT (BLINDFOLD_OPERATOR_URL)",
    )
    p.add_argument("--ca", default="", help="CA bundle that verifies its certificate")
    p.add_argument("--server-name", default="", help="the name its certificate is for")
    p.add_argument(
        "--key-file",
        default=os.environ.get("BLINDFOLD_OPERATOR_KEY_FILE", ""),
        help="file holding the operator key, 'id:secret' (BLINDFOLD_OPERATOR_KEY_FILE)",
    )
    p.add_argument("--json", action="store_true", help="print the origin's JSON answer")


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("decisions", help="list, add and delete decisions (operator key)")
    cmds = p.add_subparsers(dest="decisions_command", required=True, metavar="ACTION")
    ls = cmds.add_parser("list", help="the active decisions")
    _common(ls)
    add = cmds.add_parser("add", help="ban an address or range at every edge")
    _common(add)
    target = add.add_mutually_exclusive_group(required=True)
    target.add_argument("--ip", help="an address (an IPv6 one bans its whole /64 at edges)")
    target.add_argument("--range", help="a CIDR range")
    add.add_argument("--duration", default="4h", help="Go duration: 30s, 15m, 4h, 72h (4h)")
    add.add_argument("--reason", default="manual", help="why (shown in the stream and logs)")
    delete = cmds.add_parser("delete", help="lift a decision at every edge")
    _common(delete)
    target = delete.add_mutually_exclusive_group(required=True)
    target.add_argument("--ip")
    target.add_argument("--range")
    target.add_argument("--id", type=int)

    pp = sub.add_parser("purge", help="remove cached responses and blobs at every edge")
    _common(pp)
    pp.add_argument("--url", dest="urls", action="append", default=[], help="a URL (repeat)")
    pp.add_argument(
        "--prefix", dest="prefixes", action="append", default=[], help="host/path prefix"
    )
    pp.add_argument("--tag", dest="tags", action="append", default=[], help="a Cache-Tag name")
    pp.add_argument("--blob", dest="blobs", action="append", default=[], help="a blind blob id")


def _key(path: str) -> bytes:
    if not path:
        raise OperatorError("no operator key: --key-file or BLINDFOLD_OPERATOR_KEY_FILE")
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise OperatorError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    if mode & 0o077:
        print(f"warning: {path} is readable by others (chmod 600)", file=sys.stderr)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    _name, sep, secret = line.partition(":")
    return (secret if sep else line).strip().encode()


class _Connection(http.client.HTTPSConnection):
    """Connects to --origin's address, verifies the certificate for --server-name."""

    def __init__(self, host: str, port: int, server_name: str, ctx: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=TIMEOUT_S, context=ctx)
        self.server_name = server_name
        self.tls = ctx

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self.tls.wrap_socket(self.sock, server_hostname=self.server_name)


def request(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One request to the operator API; the decoded JSON answer. OperatorError otherwise."""
    url = args.origin
    if not url:
        raise OperatorError("no origin: --origin or BLINDFOLD_OPERATOR_URL")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise OperatorError(f"{url}: the decisions listener is https://HOST:PORT")
    key = _key(args.key_file)
    try:
        ctx = ssl.create_default_context(cafile=args.ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise OperatorError(f"--ca {args.ca}: {exc}") from None
    server_name = args.server_name or parts.hostname
    conn = _Connection(parts.hostname, parts.port or 443, server_name, ctx)
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": "Bearer " + key.decode("latin-1"), "Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, parts.path.rstrip("/") + path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read(MAX_ANSWER_BYTES + 1)
    except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
        raise OperatorError(f"{url}: {exc}") from None
    finally:
        conn.close()
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        answer = {"message": raw[:200].decode("latin-1")}
    if response.status != 200:
        message = answer.get("message") if isinstance(answer, dict) else None
        raise OperatorError(f"{response.status}: {message or response.reason}")
    return answer


def run_decisions(args: argparse.Namespace) -> int:
    try:
        if args.decisions_command == "list":
            answer = request(args, "GET", "/v1/operator/decisions")
            if args.json:
                print(json.dumps(answer, indent=2))
                return 0
            items = answer.get("decisions") or []
            print(f"{'ID':>6}  {'SCOPE':<6} {'VALUE':<40} {'EXPIRES IN':<12} ORIGIN / REASON")
            for d in items:
                print(
                    f"{d.get('id', ''):>6}  {d.get('scope', '')!s:<6} "
                    f"{d.get('value', '')!s:<40} {d.get('duration', '')!s:<12} "
                    f"{d.get('origin', '')} / {d.get('reason', '')}"
                )
            print(f"{len(items)} active decisions")
            return 0
        if args.decisions_command == "add":
            scope, value = ("ip", args.ip) if args.ip else ("range", args.range)
            body = {"scope": scope, "value": value, "duration": args.duration}
            body["reason"] = args.reason
            answer = request(args, "POST", "/v1/operator/decisions", body)
            d = answer.get("decision", {})
            if args.json:
                print(json.dumps(answer, indent=2))
            else:
                print(f"decision {d.get('id')}: ban {d.get('value')} for {d.get('duration')}")
            return 0
        if args.decisions_command == "delete":
            if args.id is not None:
                query = urlencode({"id": str(args.id)})
            else:
                scope, value = ("ip", args.ip) if args.ip else ("range", args.range)
                query = urlencode({"scope": scope, "value": value})
            answer = request(args, "DELETE", "/v1/operator/decisions?" + query)
            d = answer.get("deleted", {})
            if args.json:
                print(json.dumps(answer, indent=2))
            else:
                print(f"decision {d.get('id')} on {d.get('value')} deleted")
            return 0
    except OperatorError as exc:
        print(f"blindfold decisions: {exc}", file=sys.stderr)
        return 1
    return 2


def run_purge(args: argparse.Namespace) -> int:
    body = {"urls": args.urls, "prefixes": args.prefixes, "tags": args.tags, "blobs": args.blobs}
    if not any(body.values()):
        print("blindfold purge: name --url, --prefix, --tag or --blob", file=sys.stderr)
        return 2
    try:
        answer = request(args, "POST", "/v1/operator/purge", body)
    except OperatorError as exc:
        print(f"blindfold purge: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(f"purge {answer.get('purge')}: {answer.get('items')} items sent to every edge")
    return 0
