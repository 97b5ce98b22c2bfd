"""Issue 15 finding 5: the manifest (the content keys) must never be served where the edge
ends TLS. A keyless route, or a key server authorisation, for a hostname that serves it is
refused by the configuration checks, naming the keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from blindfold.cli.main import main
from blindfold.config import loads
from blindfold.errors import ConfigError

FILES = "/nonexistent"  # the schema checks run before any file is opened

BLIND_ROUTE = f"""
[[edge.routes]]
sni = ["cdn.example.test"]
origins = ["127.0.0.1:9443"]
mode = "blind"
certificate = "{FILES}/cdn.pem"
key = "{FILES}/cdn.key"
origin_ca = "{FILES}/ca.pem"
origin_server_name = "example.test"
blind = {{ manifest_public_key = "{FILES}/manifest-public.pem" }}
"""


def _keyless(sni: list[str], default: bool = False) -> str:
    return f"""
[[edge.routes]]
sni = {sni!r}
origins = ["127.0.0.1:9443"]
mode = "keyless"
certificate = "{FILES}/site.pem"
origin_ca = "{FILES}/ca.pem"
default = {str(default).lower()}
keyserver = {{ addresses = ["127.0.0.1:7443"], client_cert = "{FILES}/e.pem", \
client_key = "{FILES}/e.key", ca = "{FILES}/ks-ca.pem" }}
""".replace("'", '"')


def _passthrough(sni: list[str]) -> str:
    return f"""
[[edge.routes]]
sni = {sni!r}
origins = ["127.0.0.1:9443"]
""".replace("'", '"')


EDGE = '[edge]\nlisten = ["127.0.0.1:8443"]\n'
ORIGIN = f"""
[origin]
upstream = "http://127.0.0.1:8080"
listen = []
proxy_protocol = "off"

[origin.blind]
dir = "{FILES}/sealed"
site_names = ["example.test", "www.example.test"]
"""
KEYSERVER = f"""
[keyserver]
listen = "127.0.0.1:7443"
cert = "{FILES}/ks.pem"
key = "{FILES}/ks.key"
client_ca = "{FILES}/ks-ca.pem"
audit_log = "{FILES}/audit.log"
audit_key = "{FILES}/audit.key"

[[keyserver.keys]]
key = "{FILES}/site.key"
certificate = "{FILES}/site.pem"

[[keyserver.edges]]
name = "edge1"
cert_sha256 = "{"ab" * 32}"
hostnames = HOSTNAMES
"""


@pytest.mark.parametrize(
    ("routes", "bad"),
    [
        (BLIND_ROUTE + _keyless(["example.test"]), "edge.routes[1].sni"),
        (BLIND_ROUTE + _keyless(["other.test"], default=True), "edge.routes[1].default"),
        (
            _passthrough(["*.example.test"]) + BLIND_ROUTE + _keyless(["*.test"]),
            "edge.routes[2].sni",
        ),
        (BLIND_ROUTE + _passthrough(["example.test"]) + _keyless(["*.test"]), None),
        (_passthrough(["example.test"]) + BLIND_ROUTE + _keyless(["x.test"], default=True), None),
    ],
)
def test_a_keyless_route_for_the_blind_site_is_refused(routes: str, bad: str | None) -> None:
    """The name goes where the edge would send it: exact names, then the longest wildcard,
    then the default route; refused when that is a keyless route."""
    if bad is None:
        loads(EDGE + routes)
        return
    with pytest.raises(ConfigError) as info:
        loads(EDGE + routes)
    assert info.value.key == bad, info.value
    assert "example.test" in info.value.message and "manifest" in info.value.message


def test_the_blind_site_names_are_the_ones_checked() -> None:
    named = BLIND_ROUTE.replace("blind = {", 'blind = { site_names = ["www.example.test"],')
    loads(EDGE + named + _keyless(["example.test"]))  # the site is www.example.test only
    with pytest.raises(ConfigError) as info:
        loads(EDGE + named + _keyless(["*.example.test"]))
    assert info.value.key == "edge.routes[1].sni"
    assert "edge.routes[0].blind.site_names" in info.value.message


def _check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    cfg = tmp_path / "deployment.toml"
    cfg.write_text(text)
    code = main(["check-config", str(cfg)])
    return code, capsys.readouterr().err


def test_check_config_sees_origin_and_edge_in_one_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The edge alone cannot know www.example.test serves the manifest; the origin says so.
    code, err = _check(tmp_path, ORIGIN + EDGE + _keyless(["www.example.test"]), capsys)
    assert code == 2, err
    assert "edge.routes[0].sni" in err and "origin.blind.site_names" in err


@pytest.mark.parametrize("hostnames", ['["*.example.test"]', '["www.example.test"]'])
def test_check_config_sees_a_key_server_that_would_sign_for_the_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], hostnames: str
) -> None:
    text = ORIGIN + KEYSERVER.replace("HOSTNAMES", hostnames)
    code, err = _check(tmp_path, text, capsys)
    assert code == 2, err
    assert "keyserver.edges[0].hostnames" in err and "origin.blind.site_names" in err


def test_the_origin_must_name_its_site(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        loads(ORIGIN.replace('site_names = ["example.test", "www.example.test"]\n', ""))
    assert info.value.key == "origin.blind.site_names"
