"""Origin response signatures (RFC 9421 profile): sign, verify, and every way to fail."""

from __future__ import annotations

import hashlib
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from blindfold.core import msgsig
from blindfold.errors import VerificationError

KEY = Ed25519PrivateKey.generate()
BODY = b"<html>hello</html>"


def _signed(
    now: float | None = None, lifetime: float = 300, status: int = 200, body: bytes = BODY
) -> list[tuple[str, str]]:
    signer = msgsig.ResponseSigner(KEY, lifetime)
    extra = signer.headers(
        status, "text/html", hashlib.sha256(body).digest(), time.time() if now is None else now
    )
    return [(k.decode(), v.decode()) for k, v in extra] + [("content-type", "text/html")]


def test_round_trip() -> None:
    v = msgsig.verify_response(200, _signed(), BODY, KEY.public_key())
    assert {'"@status"', '"content-type"', '"content-digest"', '"date"'} <= set(v.covered)
    assert v.expires - v.created == 300


@pytest.mark.parametrize("change", ["body", "status", "type", "date", "key", "unsigned", "expired"])
def test_every_change_is_refused(change: str) -> None:
    headers, body, status, key = _signed(), BODY, 200, KEY.public_key()
    if change == "body":
        body = BODY + b" "
    elif change == "status":
        status = 404
    elif change == "type":
        headers = [(k, "text/plain" if k == "content-type" else v) for k, v in headers]
    elif change == "date":
        headers = [(k, v.replace("GMT", "UTC") if k == "date" else v) for k, v in headers]
    elif change == "key":
        key = Ed25519PrivateKey.generate().public_key()
    elif change == "unsigned":
        headers = [(k, v) for k, v in headers if not k.startswith("signature")]
    elif change == "expired":
        headers = _signed(now=time.time() - 1000, lifetime=10)
    with pytest.raises(VerificationError):
        msgsig.verify_response(status, headers, body, key)
