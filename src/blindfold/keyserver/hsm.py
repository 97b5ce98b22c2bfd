"""Site keys held in a PKCS#11 token (an HSM, or SoftHSM2 in the tests), through python-pkcs11.

The key never leaves the token: the key server finds it by label, refuses it unless the token
marks it non-extractable and sensitive, and asks the token for each signature. The content to
sign is hashed here and the token signs the digest (CKM_ECDSA, CKM_RSA_PKCS_PSS with its
parameters): every token has those two mechanisms, not every one the hash-and-sign variants.
ECDSA comes back from PKCS#11 as raw r || s (PKCS#11 v2.40 §2.3.1); TLS wants the DER
ECDSA-Sig-Value (RFC 8446 §4.2.3), converted with python-pkcs11's own helper.

PKCS#11 sessions must not be used by two threads at once: each key keeps a bounded pool of
sessions (`sessions`), a signature borrows one for its call. And python-pkcs11 0.10 initialises
the library with C_Initialize(NULL), which tells it that no two threads call it at once
(PKCS#11 v2.40 §5.4): calls into one library are serialised by a lock. Measured with SoftHSM2
(bench/hsm): two threads with a session each got CKR_GENERAL_ERROR without that lock. The key
server signs on its event loop's thread, so the lock is never contended there."""

from __future__ import annotations

import os
import queue
import stat
import threading
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ecdsa_signature

from blindfold.config.keyserver import Pkcs11Config
from blindfold.errors import ConfigError

_MGF = {
    hashes.SHA256: pkcs11.MGF.SHA256,
    hashes.SHA384: pkcs11.MGF.SHA384,
    hashes.SHA512: pkcs11.MGF.SHA512,
}
_HASH_MECH = {
    hashes.SHA256: Mechanism.SHA256,
    hashes.SHA384: Mechanism.SHA384,
    hashes.SHA512: Mechanism.SHA512,
}
_LIBS: dict[str, Any] = {}  # a PKCS#11 library is initialised once per process
_KEYS: dict[Pkcs11Config, HsmKey] = {}  # kept across reloads: no new sessions per SIGHUP
_LOGGED_IN: dict[tuple[str, str], bool] = {}
_LOCK = threading.Lock()
_CALLS: dict[str, threading.Lock] = {}  # per library: its calls one at a time (see above)


def read_pin(where: str, path: str) -> str:
    """The PIN: one line, in a file readable by its owner only."""
    try:
        st = os.stat(path)
        text = open(path, encoding="utf-8").read().strip()  # noqa: SIM115 - small file
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}.pin_file", f"cannot read {path}: {exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{where}.pin_file",
            f"{path} is open to group or others (mode {stat.S_IMODE(st.st_mode):o}): "
            f"chmod 600 {path}",
        )
    if not text:
        raise ConfigError(f"{where}.pin_file", f"{path} is empty")
    return text


class HsmKey:
    """A private key in a token, with its own pool of sessions. `public_key` is the
    certificate's, checked against the token's key by a test signature (load_key)."""

    def __init__(self, where: str, cfg: Pkcs11Config) -> None:
        self.cfg = cfg
        try:
            lib = _LIBS.get(cfg.module)
            if lib is None:
                lib = _LIBS[cfg.module] = pkcs11.lib(cfg.module)
            token = lib.get_token(token_label=cfg.token_label)
            self._calls = _CALLS.setdefault(cfg.module, threading.Lock())
        except (pkcs11.PKCS11Error, RuntimeError, OSError) as exc:
            raise ConfigError(
                f"{where}.token_label",
                f"no token {cfg.token_label!r} in {cfg.module}: {type(exc).__name__} {exc}",
            ) from None
        pin = read_pin(where, cfg.pin_file)
        self._pool: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        self._sessions: list[Any] = []
        self._login: Any = None  # closing the session that logged in logs the token out
        try:
            for _ in range(cfg.sessions):
                # PKCS#11 logs in once per token and application (§5.6 C_Login): the first
                # session of the process logs in, the others (this key's, other keys') share it
                if _LOGGED_IN.get((cfg.module, cfg.token_label)):
                    session = token.open()
                else:
                    try:
                        session = token.open(user_pin=pin)
                        self._login = session
                    except pkcs11.UserAlreadyLoggedIn:
                        session = token.open()
                    _LOGGED_IN[(cfg.module, cfg.token_label)] = True
                self._sessions.append(session)
                key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=cfg.key_label)
                self._pool.put((session, key))
        except pkcs11.NoSuchKey:
            self.close()
            raise ConfigError(
                f"{where}.key_label", f"no private key {cfg.key_label!r} in the token"
            ) from None
        except pkcs11.MultipleObjectsReturned:
            self.close()
            raise ConfigError(
                f"{where}.key_label", f"several private keys are labelled {cfg.key_label!r}"
            ) from None
        except pkcs11.PKCS11Error as exc:
            self.close()
            raise ConfigError(
                f"{where}.pin_file", f"cannot open the token: {type(exc).__name__} {exc}"
            ) from None
        session, key = self._pool.get()
        self._pool.put((session, key))
        self.key_type = key.key_type
        if key.key_type not in (KeyType.EC, KeyType.RSA):
            self.close()
            raise ConfigError(f"{where}.key_label", "only ECDSA and RSA keys")
        if key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]:
            self.close()
            raise ConfigError(
                f"{where}.key_label",
                "the token would let this key out (CKA_EXTRACTABLE true or CKA_SENSITIVE "
                "false): generate it in the token as non-extractable and sensitive",
            )
        if not cfg.allow_imported_key:
            try:
                born_here = bool(
                    key[Attribute.LOCAL]
                    and key[Attribute.NEVER_EXTRACTABLE]
                    and key[Attribute.ALWAYS_SENSITIVE]
                )
            except pkcs11.PKCS11Error:
                born_here = False  # a token that cannot say: not proven
            if not born_here:
                self.close()
                raise ConfigError(
                    f"{where}.key_label",
                    "the token did not generate this key non-extractable and sensitive "
                    "(CKA_LOCAL, CKA_NEVER_EXTRACTABLE or CKA_ALWAYS_SENSITIVE false): a copy "
                    "may exist outside it; generate it in the token, or set "
                    f"{where}.allow_imported_key = true",
                )

    def sign_digest_ec(self, digest: bytes) -> bytes:
        """DER ECDSA signature of a digest made here (CKM_ECDSA)."""
        session, key = self._pool.get()
        try:
            with self._calls:
                raw = key.sign(digest, mechanism=Mechanism.ECDSA)
        finally:
            self._pool.put((session, key))
        return bytes(encode_ecdsa_signature(raw))

    def sign_digest_pss(self, digest: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
        """RSASSA-PSS of a digest, MGF1 on the same hash, salt as long as the hash
        (RFC 8446 §4.2.3), with CKM_RSA_PKCS_PSS and its CK_RSA_PKCS_PSS_PARAMS."""
        kind = type(algorithm)
        params = (_HASH_MECH[kind], _MGF[kind], algorithm.digest_size)
        session, key = self._pool.get()
        try:
            with self._calls:
                sig = key.sign(digest, mechanism=Mechanism.RSA_PKCS_PSS, mechanism_param=params)
            return bytes(sig)
        finally:
            self._pool.put((session, key))

    def sign(self, content: bytes, public: Any, algorithm: hashes.HashAlgorithm) -> bytes:
        h = hashes.Hash(algorithm)
        h.update(content)
        digest = h.finalize()
        if isinstance(public, ec.EllipticCurvePublicKey):
            return self.sign_digest_ec(digest)
        return self.sign_digest_pss(digest, algorithm)

    def close(self) -> None:
        """Close this key's sessions, except one that logged the token in (other keys of the
        same token use that login; it lasts as long as the process)."""
        for session in self._sessions:
            if session is self._login:
                continue
            try:
                session.close()
            except pkcs11.PKCS11Error:
                pass
        self._sessions.clear()


def open_key(where: str, cfg: Pkcs11Config) -> HsmKey:
    """The key of this configuration, opened once per process (reloads reuse it)."""
    with _LOCK:
        key = _KEYS.get(cfg)
        if key is None:
            key = _KEYS[cfg] = HsmKey(where, cfg)
        return key


def check_pair(where: str, key: HsmKey, public: Any, algorithm: hashes.HashAlgorithm) -> None:
    """The token's key belongs to the certificate: a test signature verifies with its key."""
    probe = b"blindfold key check " + os.urandom(16)
    try:
        sig = key.sign(probe, public, algorithm)
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(sig, probe, ec.ECDSA(algorithm))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(
                sig,
                probe,
                padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size),
                algorithm,
            )
        else:
            raise ConfigError(where, "the certificate's key is neither ECDSA nor RSA")
    except ConfigError:
        raise
    except Exception as exc:  # InvalidSignature, or the token refusing the mechanism
        raise ConfigError(
            where,
            f"the token's key {key.cfg.key_label!r} does not belong to the certificate "
            f"({type(exc).__name__} {exc})",
        ) from None
