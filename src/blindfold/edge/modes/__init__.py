"""The registry of edge modes: a route's `mode` names one of these. Adding a mode is one
module beside these (a `Mode` subclass, see `edge.mode`) and one line here; the config
schema lists the names (`config.edge.RouteConfig.mode`) and the settings only that mode reads.

Only the worker (and `blindfold check-config`, through `check_route`) use the registry; a mode
never imports the worker or another mode."""

from __future__ import annotations

from pathlib import Path

from blindfold.config.edge import EdgeConfig, RouteConfig
from blindfold.edge.mode import Mode
from blindfold.edge.modes.blind import BlindMode
from blindfold.edge.modes.keyless import KeylessMode
from blindfold.edge.modes.passthrough import PassthroughMode
from blindfold.errors import ConfigError
from blindfold.obs.metrics import MetricSpec

MODES: dict[str, type[Mode]] = {
    PassthroughMode.name: PassthroughMode,
    KeylessMode.name: KeylessMode,
    BlindMode.name: BlindMode,
}


def check_route(where: str, rc: RouteConfig, edge: EdgeConfig) -> None:
    """What `blindfold check-config` checks of a route beyond the schema: its mode's files,
    and that the certificate of a route that ends TLS covers every hostname the route takes
    (else visitors of the others get a certificate error)."""
    MODES[rc.mode].check_config(where, rc, edge)
    if rc.mode in ("keyless", "blind") and rc.certificate:
        names = certificate_names(rc.certificate, f"{where}.certificate")
        missing = [sni for sni in rc.sni if not covered(sni, names)]
        if missing:
            raise ConfigError(
                f"{where}.sni",
                f"{', '.join(missing)} not covered by the certificate {rc.certificate} "
                f"(it is for {', '.join(names) or 'no DNS name'}): visitors would get a "
                "certificate error; give the route a certificate for these names",
            )


def certificate_names(path: str, key: str) -> list[str]:
    """The DNS names of the first certificate in the PEM file at `path`."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(key, f"cannot load {path}: {exc}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]


def covered(sni: str, names: list[str]) -> bool:
    """A route's SNI pattern ('shop.example' or '*.shop.example') is covered by a
    certificate name: the same name, or a wildcard covering one more label (RFC 6125 §6.4.3);
    a wildcard pattern only by the same wildcard."""
    sni = sni.lower().rstrip(".")
    if sni in names:
        return True
    if sni.startswith("*."):
        return False
    _label, _, parent = sni.partition(".")
    return bool(parent) and f"*.{parent}" in names


def metrics() -> list[MetricSpec]:
    """Every mode's metrics (the worker reports them to the master, which renders them)."""
    return [spec for mode in MODES.values() for spec in mode.metrics]
