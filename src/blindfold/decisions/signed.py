"""Decisions signed by the origin that made them, for channels every edge can write to (Redis).

Sans-IO. Format, version 1 (docs/decisions.md says the same):

    bfd1.<signer>.<payload>.<signature>     a ban
    bfu1.<signer>.<payload>.<signature>     a lift: the end of a ban before its `until`

- `signer`: 16 lower-case hex digits, the first 8 bytes of SHA-256 over the signer's raw
  32-byte Ed25519 public key (RFC 8032 §5.1.5 encoding). It only picks the key to try.
- `payload`: base64url without padding (RFC 4648 §5) of a UTF-8 JSON object:
  {"scope": "ip"|"range", "value": TEXT, "until": SECONDS, "issued": SECONDS, "reason": TEXT}
  (`until` and `issued` are Unix times; `value` in canonical form), and, when a trusted
  edge's PROXY claim of the visitor's address caused it, `edge` and `edge_address`: the
  edge's name at the origin ("" when it has none) and its address; `operator`, the operator
  key's id, when an operator made the ban or the lift. A lift has the same
  fields: it ends the signer's bans on (scope, value) issued at or before its `issued`; its
  `until` is the lifted ban's, after which there is nothing left to lift.
- `signature`: base64url without padding of the 64-byte Ed25519 signature (RFC 8032 §5.1.6)
  over  b"blindfold decision v1\\x00" (a lift: b"blindfold decision lift v1\\x00") + signer +
  b"." + payload  (the ASCII text of both fields as sent). The purpose prefix keeps a signature
  from meaning anything else: no other blindfold format signs bytes that start with either,
  so a ban's signature cannot be taken for a lift's or the other way round.

A verifier drops (and names the reason of) every message that is not well formed, comes from
an unknown signer, does not verify, has expired, or is older than what it already holds for
the same (scope, value): a replay. A ban ends at its signed `until` or with a signed lift,
never because a key went missing (an edge that can write to Redis can make keys go missing).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from blindfold.decisions.core import Scope, normalise
from blindfold.errors import ConfigError, ProtocolError

PURPOSE = b"blindfold decision v1\x00"
LIFT_PURPOSE = b"blindfold decision lift v1\x00"
MAGIC = "bfd1"
LIFT_MAGIC = "bfu1"
MAX_MESSAGE_BYTES = 2048  # a decision is ~300 bytes; nothing bigger is even decoded


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or not text.isascii() or "=" in text:
        raise ValueError("not base64url")
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


@dataclass(frozen=True, slots=True)
class SignedDecision:
    scope: Scope
    value: str
    until: float
    issued: float
    reason: str
    signer: str
    lift: bool = False  # a lift of the signer's bans on (scope, value), not a ban
    edge: str = ""  # the name of the edge whose PROXY claim caused it ("" if none or unnamed)
    edge_address: str = ""  # that edge's address ("" when no edge's claim caused it)
    operator: str = ""  # the operator key's id, for a ban or lift an operator made


class DecisionSigner:
    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._key = private
        self.signer = key_id(private.public_key())

    @property
    def key(self) -> Ed25519PrivateKey:
        """The private key (blindfold.decisions.purge signs purges with it, under their own
        purpose prefix)."""
        return self._key

    def sign(
        self,
        scope: str,
        value: str,
        until: float,
        issued: float,
        reason: str,
        edge: str = "",
        edge_address: str = "",
        operator: str = "",
    ) -> str:
        """A ban on (scope, value) until `until`; `edge`, `edge_address`: who reported it;
        `operator`: the operator key's id when an operator made it."""
        return self._sign(
            MAGIC, PURPOSE, scope, value, until, issued, reason, (edge, edge_address), operator
        )

    def sign_lift(
        self, scope: str, value: str, until: float, issued: float, reason: str, operator: str = ""
    ) -> str:
        """The end, at `issued`, of this signer's bans on (scope, value); `until`: the lifted
        ban's (edges remember the lift until then, so the ban cannot be played back)."""
        return self._sign(
            LIFT_MAGIC, LIFT_PURPOSE, scope, value, until, issued, reason, ("", ""), operator
        )

    def _sign(
        self,
        magic: str,
        purpose: bytes,
        scope: str,
        value: str,
        until: float,
        issued: float,
        reason: str,
        edge: tuple[str, str],
        operator: str = "",
    ) -> str:
        s, v = normalise(scope, value)
        fields: dict[str, object] = {
            "scope": s,
            "value": v,
            "until": until,
            "issued": issued,
            "reason": reason[:200],
        }
        if edge[0]:
            fields["edge"] = edge[0][:200]
        if edge[1]:
            fields["edge_address"] = edge[1][:64]
        if operator:
            fields["operator"] = operator[:64]
        payload = json.dumps(fields, separators=(",", ":")).encode()
        encoded = _b64(payload)
        signature = self._key.sign(purpose + f"{self.signer}.{encoded}".encode("ascii"))
        return f"{magic}.{self.signer}.{encoded}.{_b64(signature)}"


class DecisionVerifier:
    """Opens signed decisions and lifts from any of `keys`; remembers, per (signer, scope,
    value), the newest `issued` it accepted (a ban, or a lift) so that an older message
    replayed later is refused: a lifted ban cannot come back, a lift cannot end a newer ban."""

    def __init__(self, keys: list[Ed25519PublicKey]) -> None:
        self.keys = {key_id(k): k for k in keys}
        # (signer, scope, value) -> (issued, until, lifted)
        self.held: dict[tuple[str, str, str], tuple[float, float, bool]] = {}

    def open(self, message: bytes | str, now: float) -> SignedDecision:
        """Verify one message (a ban or a lift). Raises ProtocolError with reason unsigned |
        unknown_signer | bad_signature | bad_decision | expired."""
        if isinstance(message, bytes):
            if len(message) > MAX_MESSAGE_BYTES:
                raise ProtocolError("unsigned", "too long to be a signed decision")
            try:
                message = message.decode("ascii")
            except UnicodeDecodeError:
                raise ProtocolError("unsigned", "not ASCII") from None
        if len(message) > MAX_MESSAGE_BYTES:
            raise ProtocolError("unsigned", "too long to be a signed decision")
        parts = message.split(".")
        if len(parts) != 4 or parts[0] not in (MAGIC, LIFT_MAGIC):
            raise ProtocolError("unsigned", "not a bfd1 signed decision or bfu1 lift")
        magic, signer, encoded, sig_text = parts
        lift = magic == LIFT_MAGIC
        purpose = LIFT_PURPOSE if lift else PURPOSE
        key = self.keys.get(signer)
        if key is None:
            raise ProtocolError("unknown_signer", f"signer {signer[:20]!r}")
        try:
            signature = _unb64(sig_text)
            key.verify(signature, purpose + f"{signer}.{encoded}".encode("ascii"))
        except (ValueError, binascii.Error, InvalidSignature, UnicodeEncodeError):
            raise ProtocolError("bad_signature", f"signer {signer}") from None
        # verified: the origin wrote these bytes; still checked, never trusted to be sane
        try:
            item = json.loads(_unb64(encoded))
            scope, value = normalise(str(item["scope"]), str(item["value"]))
            until = float(item["until"])
            issued = float(item["issued"])
            reason = str(item.get("reason", ""))[:200]
            edge = str(item.get("edge", ""))[:200]
            edge_address = str(item.get("edge_address", ""))[:64]
            operator = str(item.get("operator", ""))[:64]
        except (ValueError, KeyError, TypeError, RecursionError, binascii.Error, AttributeError):
            raise ProtocolError("bad_decision", "signed payload is not a decision") from None
        if not (math.isfinite(until) and math.isfinite(issued)):
            raise ProtocolError("bad_decision", "times are not finite")
        if until <= now:
            raise ProtocolError("expired", f"{value} until {until}")
        return SignedDecision(
            scope, value, until, issued, reason, signer, lift, edge, edge_address, operator
        )

    def admit(self, message: bytes | str, now: float) -> SignedDecision | None:
        """`open`, then the replay check: None when this exact decision or lift is already held
        (a resync reads it again); ProtocolError('replayed') when an older one comes back, or a
        ban issued no later than a lift of it held here (a lift ends the bans issued up to its
        own `issued`, so it wins a tie)."""
        d = self.open(message, now)
        key = (d.signer, d.scope, d.value)
        held = self.held.get(key)
        until = d.until
        if held is not None and held[1] > now:
            issued, held_until, lifted = held
            if d.issued < issued or (d.issued == issued and lifted and not d.lift):
                kind = "lift" if d.lift else "ban"
                raise ProtocolError("replayed", f"{kind} of {d.value} issued {d.issued} < {issued}")
            if d.issued == issued and d.lift == lifted:
                return None
            if d.lift:  # remembered while the lifted ban could still be played back
                until = max(until, held_until)
        self.held[key] = (d.issued, until, d.lift)
        return d

    def holds_until(self, scope: str, value: str, now: float) -> float | None:
        """The latest `until` of the bans on (scope, value) held from any signer, or None."""
        best = None
        for signer in self.keys:
            held = self.held.get((signer, scope, value))
            if held is None or held[2] or held[1] <= now:
                continue
            if best is None or held[1] > best:
                best = held[1]
        return best

    def sweep(self, now: float) -> None:
        for key in [k for k, (_i, until, _l) in self.held.items() if until <= now]:
            del self.held[key]


def load_private_key(path: str, where: str) -> Ed25519PrivateKey:
    try:
        key = load_pem_private_key(Path(path).read_bytes(), None)
    except OSError as exc:
        raise ConfigError(where, f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(where, f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            where, f"{path} is not an Ed25519 key (openssl genpkey -algorithm ed25519)"
        )
    return key


def load_public_key(path: str, where: str) -> Ed25519PublicKey:
    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(where, f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(where, f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(where, f"{path} is not an Ed25519 public key")
    return key
