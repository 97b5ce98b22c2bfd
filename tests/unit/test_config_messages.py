"""check-config's messages as a new operator reads them (issue 16): a misspelt key gets a
suggestion, a syntax error names the file once, a route is named by its name, counts and type
names read naturally, a wrong key path blames `key`, a route that ends TLS with a certificate
that does not cover its hostnames is an error, and durations take units."""

from __future__ import annotations

from pathlib import Path

import pytest

from blindfold import pki
from blindfold.cli.main import main
from blindfold.config import loads
from blindfold.config.schema import _convert
from blindfold.decisions.core import parse_duration
from blindfold.errors import ConfigError, ProtocolError

ORIGIN = (
    "[origin]\nupstream = 'http://127.0.0.1:1'\nlisten = []\nproxy_protocol = 'off'\n"
    "[origin.waf]\nenabled = false\n"
)


def _check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "c.toml"
    path.write_text(text)
    code = main(["check-config", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_misspelt_key_gets_did_you_mean_not_every_key() -> None:
    with pytest.raises(ConfigError) as info:
        loads(ORIGIN.replace("listen = []", "listen = []\nproxy_header_timeot_s = 3"))
    assert info.value.key == "origin.proxy_header_timeot_s"
    assert "did you mean 'proxy_header_timeout_s'?" in str(info.value)
    assert "allowed here" not in str(info.value)
    with pytest.raises(ConfigError) as info:  # nothing close: the list, as before
        loads(ORIGIN.replace("listen = []", "listen = []\nzzzz = 3"))
    assert "allowed here" in str(info.value)


def test_a_syntax_error_names_the_file_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _check(tmp_path, '[edge]\nlisten = ["127.0.0.1:1"\n', capsys)
    assert code == 2
    assert out.count("c.toml") == 1 and "not valid TOML" in out, out


def test_routes_are_named_by_name_and_counts_read_naturally(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    route = '[[edge.routes]]\nname = "www"\nsni = ["b.test"]\norigins = ["127.0.0.1:2"]\n'
    text = '[edge]\nlisten = ["127.0.0.1:1"]\n' + route
    code, out = _check(tmp_path, text + 'proxy_protocol = "v3"\n', capsys)
    assert code == 2
    assert 'edge.routes[0].proxy_protocol (route "www"): expected one of' in out, out
    code, out = _check(tmp_path, text, capsys)
    assert code == 0 and "edge (1 route, 1 listener)" in out, out
    with pytest.raises(ConfigError) as info:
        loads('[edge]\nlisten = "127.0.0.1:1"\n' + route)
    assert "expected a list of strings" in str(info.value)


def test_durations_take_units() -> None:
    text = ORIGIN.replace("listen = []", "listen = []\nproxy_header_timeout_s = '1m30s'")
    text += "[origin.decisions]\nban_duration_s = '4h'\n"
    cfg = loads(text).origin
    assert cfg is not None
    assert cfg.proxy_header_timeout_s == 90.0 and cfg.decisions.ban_duration_s == 4 * 3600
    assert _convert(int, "1h", "origin.quic.alt_svc_max_age_s") == 3600  # int keys: whole s
    for bad in ("5 s", "4 hours", "1d", "", "s"):
        with pytest.raises(ConfigError) as info:
            loads(ORIGIN.replace("listen = []", f"listen = []\nproxy_header_timeout_s = '{bad}'"))
        assert info.value.key == "origin.proxy_header_timeout_s"
        assert "such as '30s'" in str(info.value)
    with pytest.raises(ConfigError, match="whole seconds"):
        _convert(int, "1.5s", "origin.quic.alt_svc_max_age_s")
    assert parse_duration("1h30m") == 5400.0  # the old import still works
    with pytest.raises(ProtocolError):
        parse_duration("4 hours")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    ca = pki.make_ca()
    leaf = pki.issue(ca, ["www.shop.test"])
    leaf.write(tmp_path / "www.pem", tmp_path / "www.key")
    ca.write(tmp_path / "ca.pem", tmp_path / "ca.key")
    edge = pki.issue(ca, [], client=True, server=False, common_name="e1")
    edge.write(tmp_path / "e1.pem", tmp_path / "e1.key")
    return {p.stem + p.suffix: p for p in tmp_path.iterdir()}


def test_a_wrong_key_path_blames_key(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        '[keyserver]\nlisten = "127.0.0.1:0"\n'
        f'cert = "{files["www.pem"]}"\nkey = "{files["www.key"]}"\n'
        f'client_ca = "{files["ca.pem"]}"\naudit_log = "{tmp_path / "audit.log"}"\n'
        f'audit_key = "{tmp_path / "audit.key"}"\n'
        f'[[keyserver.keys]]\nkey = "{tmp_path / "nope.key"}"\n'
        f'certificate = "{files["www.pem"]}"\n'
    )
    code, out = _check(tmp_path, text, capsys)
    assert code == 2 and "keyserver.keys[0].key: cannot load" in out, out


@pytest.mark.parametrize("sni", ["shop.test", "*.shop.test"])
def test_a_keyless_route_whose_certificate_does_not_cover_its_names_is_an_error(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str], sni: str
) -> None:
    ks = (
        f'{{ addresses = ["127.0.0.1:7"], client_cert = "{files["e1.pem"]}", '
        f'client_key = "{files["e1.key"]}", ca = "{files["ca.pem"]}" }}'
    )
    route = (
        '[edge]\nlisten = ["127.0.0.1:1"]\n[[edge.routes]]\nname = "www"\n'
        'sni = ["www.shop.test", "SNI"]\nmode = "keyless"\n'
        f'certificate = "{files["www.pem"]}"\norigins = ["127.0.0.1:2"]\n'
        f'origin_ca = "{files["ca.pem"]}"\nkeyserver = {ks}\n'
    )
    code, out = _check(tmp_path, route.replace(', "SNI"', ""), capsys)
    assert code == 0, out
    code, out = _check(tmp_path, route.replace("SNI", sni), capsys)
    assert code == 2, out
    assert f'edge.routes[0].sni (route "www"): {sni} not covered by the certificate' in out


def test_keyserver_listen_is_a_list_like_every_listen(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    base = (
        "[keyserver]\nlisten = LISTEN\n"
        f'cert = "{files["www.pem"]}"\nkey = "{files["www.key"]}"\n'
        f'client_ca = "{files["ca.pem"]}"\naudit_log = "{tmp_path / "audit.log"}"\n'
        f'audit_key = "{tmp_path / "audit.key"}"\n'
        f'[[keyserver.keys]]\nkey = "{files["www.key"]}"\ncertificate = "{files["www.pem"]}"\n'
    )
    for listen in ('["127.0.0.1:7443"]', '"127.0.0.1:7443"'):
        ks = loads(base.replace("LISTEN", listen)).keyserver
        assert ks is not None and ks.address == "127.0.0.1:7443"
    with pytest.raises(ConfigError) as info:
        loads(base.replace("LISTEN", '["127.0.0.1:1", "127.0.0.1:2"]'))
    assert info.value.key == "keyserver.listen" and "one address" in str(info.value)


@pytest.mark.parametrize("wrong", ["cert", "key"])
def test_a_wrong_origin_certificate_path_blames_that_key(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str], wrong: str
) -> None:
    paths = {"cert": files["www.pem"], "key": files["www.key"], wrong: tmp_path / "nope"}
    text = (
        "[origin]\nupstream = 'http://127.0.0.1:1'\nlisten = ['127.0.0.1:0']\n"
        "trusted_edges = ['127.0.0.1/32']\n[origin.waf]\nenabled = false\n"
        f'[[origin.certificates]]\ncert = "{paths["cert"]}"\nkey = "{paths["key"]}"\n'
    )
    code, out = _check(tmp_path, text, capsys)
    assert code == 2 and f"origin.certificates[0].{wrong}: cannot read" in out, out
