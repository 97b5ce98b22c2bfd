"""TLS for the origin: the site's certificates, chosen by SNI, ALPN h2 and http/1.1."""

from __future__ import annotations

import os
import ssl
import weakref
from collections.abc import Container, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID

from blindfold.config.common import check_readable
from blindfold.config.origin import CertificateConfig, OriginConfig
from blindfold.core.certchain import ChainError, check_replaced_pem, leaf_names
from blindfold.errors import ConfigError


def _names(cert_path: str) -> list[str]:
    return _cert_names(x509.load_pem_x509_certificate(Path(cert_path).read_bytes()))


def _cert_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        value = san.value
        assert isinstance(value, x509.SubjectAlternativeName)
        names = [n.lower() for n in value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [
            str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return names


class SiteTls:
    """One SSLContext per certificate; the default context's SNI callback switches to the one
    whose names match (exact, then one-label wildcard as certificates use them)."""

    def __init__(
        self,
        certificates: tuple[CertificateConfig, ...],
        *,
        alpn: tuple[str, ...] = ("h2", "http/1.1"),
        key: str = "origin.certificates",  # named in errors (with [i] for the site's list)
        now: float | None = None,
        check: Container[int] = (),
        previous: Sequence[Sequence[str]] = (),
    ) -> None:
        """With `now` (replaced files), the chains at the indices in `check` must pass
        core.certchain's checks: each certificate signed by the next, the leaf valid at `now`
        and covering every DNS name of the certificate it replaces (`previous[i]`, the `names`
        of the SiteTls in service)."""
        self.contexts: list[ssl.SSLContext] = []
        # (first name, not_after as POSIX seconds) per certificate, in configuration order
        self.expiry: list[tuple[str, float]] = []
        self.names: list[list[str]] = []  # the leaves' DNS names, in configuration order
        self.by_name: dict[str, ssl.SSLContext] = {}
        self.sni: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()
        for i, c in enumerate(certificates):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_alpn_protocols(list(alpn))
            ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
            where = f"{key}[{i}]" if key == "origin.certificates" else key
            check_readable((f"{where}.cert", c.cert), (f"{where}.key", c.key))
            try:
                ctx.load_cert_chain(c.cert, c.key)  # OpenSSL checks that the key fits
                leaf = x509.load_pem_x509_certificate(Path(c.cert).read_bytes())
                names = _cert_names(leaf)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(where, f"cannot load {c.cert} / {c.key}: {exc}") from None
            end = leaf.not_valid_after_utc.timestamp()
            if now is not None and i in check:
                try:
                    check_replaced_pem(c.cert, previous[i] if i < len(previous) else (), now)
                except ChainError as exc:
                    raise ConfigError(where, str(exc)) from None
            self.names.append(leaf_names(leaf))
            self.expiry.append((names[0] if names else "", end))
            self.contexts.append(ctx)
            for name in names:
                self.by_name.setdefault(name, ctx)
        self.default = self.contexts[0]
        self.default.sni_callback = self._select

    def _select(self, obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        if name is None:
            return
        name = name.lower()
        self.sni[obj] = name
        ctx = self.by_name.get(name)
        if ctx is None and "." in name:
            ctx = self.by_name.get("*." + name.split(".", 1)[1])
        if ctx is not None and ctx is not self.default:
            obj.context = ctx


def file_stamps(certificates: tuple[CertificateConfig, ...]) -> tuple[object, ...]:
    """What changes when a certificate or key file is replaced (rename: a new inode) or
    rewritten; polled to reload renewed files."""
    out: list[object] = []
    for c in certificates:
        for path in (c.cert, c.key):
            try:
                st = os.stat(path)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append(None)
    return tuple(out)


def decisions_tls(cfg: OriginConfig) -> SiteTls:
    """TLS for the decision stream: its own certificate, which must name none of the site's
    names (a scanner reaching the port would map them to the origin's address)."""
    d = cfg.decisions
    tls = SiteTls(
        (CertificateConfig(d.cert, d.key),), alpn=("http/1.1",), key="origin.decisions.cert"
    )
    site: set[str] = set()
    for c in cfg.certificates:
        try:
            site.update(_names(c.cert))
        except (OSError, ValueError):
            continue  # reported by SiteTls for the site's certificates
    shared = sorted(site & set(_names(d.cert)))
    if shared:
        raise ConfigError(
            "origin.decisions.cert",
            f"names the site's {', '.join(shared)}: anyone reaching the decision port would "
            "learn them; use a certificate of its own (`blindfold pki server decisions DIR "
            "--host origin.internal`)",
        )
    return tls
