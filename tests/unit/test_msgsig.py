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
ASKED = msgsig.RequestRef("GET", "https://example.test:8443/docs/page.html?v=1")


def _signed(
    now: float | None = None,
    lifetime: float = 300,
    status: int = 200,
    body: bytes = BODY,
    request: msgsig.RequestRef = ASKED,
) -> list[tuple[str, str]]:
    signer = msgsig.ResponseSigner(KEY, lifetime)
    extra = signer.headers(
        status,
        "text/html",
        hashlib.sha256(body).digest(),
        time.time() if now is None else now,
        request,
    )
    return [(k.decode(), v.decode()) for k, v in extra] + [("content-type", "text/html")]


def test_round_trip() -> None:
    v = msgsig.verify_response(200, _signed(), BODY, KEY.public_key(), ASKED)
    assert {'"@status"', '"content-type"', '"content-digest"', '"date"'} <= set(v.covered)
    assert {'"@method";req', '"@authority";req', '"@path";req', '"@query";req'} <= set(v.covered)
    assert v.expires - v.created == 300


def test_the_authority_is_compared_as_rfc_9421_normalises_it() -> None:
    # §2.2.3: lower case, the default port left out
    signed = _signed(request=msgsig.RequestRef("GET", "https://Example.TEST:443/a"))
    msgsig.verify_response(
        200, signed, BODY, KEY.public_key(), msgsig.RequestRef("GET", "https://example.test/a")
    )


@pytest.mark.parametrize(
    "change", ["body", "status", "type", "date", "key", "unsigned", "expired", "unsignable"]
)
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
    elif change == "unsignable":  # a target no URL can hold: sent unsigned, so refused
        headers = _signed(request=msgsig.RequestRef("GET", "https://example.test/a b"))
        assert not any(k.startswith("signature") for k, _ in headers)
    with pytest.raises(VerificationError):
        msgsig.verify_response(status, headers, body, key, ASKED)


@pytest.mark.parametrize(
    "other",
    [
        "https://example.test:8443/docs/other.html?v=1",  # another path
        "https://example.test:8443/docs/page.html?v=2",  # another query
        "https://example.test:8443/docs/page.html",  # no query
        "https://evil.test:8443/docs/page.html?v=1",  # another host
        "https://example.test:9443/docs/page.html?v=1",  # another port
    ],
)
def test_a_response_signed_for_another_request_is_refused(other: str) -> None:
    """Issue 8 finding 7: a signed response replayed for another URL (RFC 9421 §2.4)."""
    with pytest.raises(VerificationError):
        msgsig.verify_response(
            200, _signed(), BODY, KEY.public_key(), msgsig.RequestRef("GET", other)
        )
    with pytest.raises(VerificationError):  # and for another method
        msgsig.verify_response(
            200, _signed(), BODY, KEY.public_key(), msgsig.RequestRef("HEAD", ASKED.url)
        )
