"""Origin-signed responses: RFC 9421 HTTP Message Signatures (Ed25519) over `@status`,
`content-type`, `content-digest` (RFC 9530, SHA-256 of the body) and `date`, and over the
request the response answers (RFC 9421 §2.4, the `req` parameter: its `@method`, `@authority`,
`@path` and `@query`), with `created` and `expires`, tag "blindfold". Built on the
`http-message-signatures` package (the signature base, Structured Fields, the algorithms,
`;req` resolution); this module only fixes the profile: what is covered and how a response is
checked end to end (signature, age, coverage, the request it answers, body digest)."""

from __future__ import annotations

import base64
import datetime
import email.utils
from dataclasses import dataclass

import http_message_signatures as hms
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from http_message_signatures.algorithms import ED25519

from blindfold.core.manifest import key_id
from blindfold.errors import VerificationError

# RFC 9421 §2.4: a response signature may cover components of the request it answers, so a
# signed response cannot be served for another method, host, path or query.
REQUEST_COVERED = ('"@method";req', '"@authority";req', '"@path";req', '"@query";req')
COVERED = ("@status", "content-type", "content-digest", "date", *REQUEST_COVERED)
TAG = "blindfold"
LABEL = "blindfold"


@dataclass(frozen=True, slots=True)
class RequestRef:
    """The request a response answers: its method and absolute URL (https://host[:port]/path
    [?query], as the client asked for it)."""

    method: str
    url: str


class _Request:
    def __init__(self, ref: RequestRef) -> None:
        self.method = ref.method
        self.url = ref.url
        self.headers: dict[str, str] = {}


class _Response:
    """The message shape http-message-signatures resolves components from."""

    def __init__(self, status: int, headers: dict[str, str], request: RequestRef) -> None:
        self.status_code = status
        self.headers = headers
        self.request = _Request(request)


def content_digest(sha256: bytes) -> str:
    return "sha-256=:" + base64.b64encode(sha256).decode() + ":"  # RFC 9530 §2


class _Keys(hms.HTTPSignatureKeyResolver):
    def __init__(
        self, private: Ed25519PrivateKey | None = None, public: Ed25519PublicKey | None = None
    ) -> None:
        self.private = private
        self.public = public

    def resolve_private_key(self, key_id: str) -> Ed25519PrivateKey:
        assert self.private is not None
        return self.private

    def resolve_public_key(self, key_id: str) -> Ed25519PublicKey | None:
        return self.public


class ResponseSigner:
    def __init__(self, key: Ed25519PrivateKey, lifetime_s: float) -> None:
        self.key_id = key_id(key.public_key())
        self.lifetime_s = lifetime_s
        self._signer = hms.HTTPMessageSigner(
            signature_algorithm=ED25519, key_resolver=_Keys(private=key)
        )

    def headers(
        self,
        status: int,
        content_type: str,
        body_sha256: bytes,
        now: float,
        request: RequestRef,
    ) -> list[tuple[bytes, bytes]]:
        """Date, Content-Digest, Signature-Input and Signature for a response to `request`;
        none when the request cannot be named as a URL (then the response goes unsigned,
        and a verifier refuses it)."""
        fields = {
            "content-type": content_type,
            "content-digest": content_digest(body_sha256),
            "date": email.utils.formatdate(now, usegmt=True),
        }
        message = _Response(status, fields, request)
        created = datetime.datetime.fromtimestamp(int(now), datetime.UTC)
        try:
            self._signer.sign(
                message,
                key_id=self.key_id,
                created=created,
                expires=created + datetime.timedelta(seconds=self.lifetime_s),
                tag=TAG,
                label=LABEL,
                covered_component_ids=COVERED,
                use_existing_digest=True,
            )
        except hms.HTTPMessageSignaturesException:
            return []  # e.g. a target with bytes a URL may not hold
        return [
            (k.lower().encode(), v.encode())
            for k, v in message.headers.items()
            if k.lower() != "content-type"
        ]


@dataclass(frozen=True, slots=True)
class Verified:
    key_id: str
    created: int
    expires: int
    covered: tuple[str, ...]


def verify_response(
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    public: Ed25519PublicKey,
    request: RequestRef,
    max_age_s: float = 86400.0,
) -> Verified:
    """Check a response's blindfold signature: key, algorithm, expiry and age, that every
    component of the profile is covered, that it answers `request` (the method and URL this
    client sent: a response signed for another request fails), and the body against the
    signed Content-Digest."""
    merged: dict[str, str] = {}
    for k, v in headers:
        k = k.lower()
        merged[k] = f"{merged[k]}, {v}" if k in merged else v
    if "signature" not in merged:
        raise VerificationError("response is not signed (no Signature field)")
    verifier = hms.HTTPMessageVerifier(
        signature_algorithm=ED25519, key_resolver=_Keys(public=public)
    )
    try:
        results = verifier.verify(
            _Response(status, merged, request),
            expect_tag=TAG,
            max_age=datetime.timedelta(seconds=max_age_s),
            require_components=COVERED,
            body=body,
        )
    except (hms.InvalidSignature, hms.HTTPMessageSignaturesException) as exc:
        raise VerificationError(f"response signature: {exc or type(exc).__name__}") from None
    if len(results) != 1:
        raise VerificationError(f"response signature: {len(results)} blindfold signatures")
    params = results[0].parameters
    if params.get("keyid") != key_id(public):
        raise VerificationError(f"response signed by key {params.get('keyid')!r}")
    return Verified(
        str(params["keyid"]),
        int(params["created"]),
        int(params.get("expires", 0)),
        tuple(results[0].covered_components),
    )
