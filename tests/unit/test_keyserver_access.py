"""Which keys an edge may sign with (keyserver.access), worked out from the configuration: a
certificate is usable by an edge only if the edge is authorised for every name it covers
(atk-trust finding 1); a partial authorisation is reported by check-config and at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from blindfold import pki
from blindfold.cli.main import main
from blindfold.config import loads
from blindfold.config.keyserver import KeyConfig
from blindfold.keyserver.access import partial_grants, too_broad
from blindfold.keyserver.signer import load_key


def _config(tmp: Path, edges: dict[str, list[str]]) -> str:
    text = f"""
[keyserver]
listen = "127.0.0.1:7443"
cert = "{tmp / "ks.pem"}"
key = "{tmp / "ks.key"}"
client_ca = "{tmp / "ca.pem"}"
audit_log = "{tmp / "audit.log"}"
audit_key = "{tmp / "audit.key"}"

[[keyserver.keys]]
name = "shared"
key = "{tmp / "shared.key"}"
certificate = "{tmp / "shared.pem"}"

[[keyserver.keys]]
name = "own"
key = "{tmp / "own.key"}"
certificate = "{tmp / "own.pem"}"
"""
    for i, (name, hosts) in enumerate(edges.items()):
        quoted = ", ".join(f'"{h}"' for h in hosts)
        text += f"""
[[keyserver.edges]]
name = "{name}"
cert_sha256 = "{i + 1:064x}"
hostnames = [{quoted}]
"""
    return text


@pytest.fixture
def files(tmp_path: Path, ca: pki.Issued) -> Path:
    pki.issue(ca, ["example.test", "*.example.test"]).write(
        tmp_path / "shared.pem", tmp_path / "shared.key"
    )
    pki.issue(ca, ["keyless.example.test"]).write(tmp_path / "own.pem", tmp_path / "own.key")
    return tmp_path


EDGES = {
    "narrow": ["keyless.example.test"],  # covers `own` fully, `shared` partly
    "wide": ["example.test", "*.example.test"],  # covers both fully
    "apart": ["other.test"],  # touches neither
}


def test_each_edge_gets_only_the_keys_it_covers_fully(files: Path) -> None:
    cfg = loads(_config(files, EDGES)).keyserver
    assert cfg is not None
    keys = [load_key(i, k) for i, k in enumerate(cfg.keys)]
    shared, own = keys
    assert shared.names == ("example.test", "*.example.test")
    assert too_broad(EDGES["narrow"], keys) == {
        shared.cert_sha256: ("example.test", "*.example.test")
    }
    assert too_broad(EDGES["wide"], keys) == {}
    assert set(too_broad(EDGES["apart"], keys)) == {shared.cert_sha256, own.cert_sha256}
    grants = partial_grants(cfg.edges, keys)
    assert [(g.edge, g.key, g.unauthorised) for g in grants] == [
        ("narrow", "shared", ("example.test", "*.example.test"))
    ]
    assert "keyserver.edges[0]" in grants[0].text() and "keyserver.keys[0]" in grants[0].text()


def test_ip_address_names_count(tmp_path: Path, ca: pki.Issued) -> None:
    pki.issue(ca, ["a.test", "192.0.2.1"]).write(tmp_path / "ip.pem", tmp_path / "ip.key")
    key = load_key(0, KeyConfig(key=str(tmp_path / "ip.key"), certificate=str(tmp_path / "ip.pem")))
    assert key.names == ("a.test", "192.0.2.1")
    assert too_broad(["a.test"], [key]) == {key.cert_sha256: ("192.0.2.1",)}


def test_check_config_reports_a_partly_authorised_edge(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = files / "ks.toml"
    path.write_text(_config(files, EDGES))
    assert main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1, err
    assert "keyserver.edges[0] (narrow)" in warnings[0] and "(shared)" in warnings[0]
    assert "*.example.test" in warnings[0] and "certificate of their own" in warnings[0]
    path.write_text(_config(files, {"wide": EDGES["wide"]}))
    assert main(["check-config", str(path)]) == 0
    assert "warning" not in capsys.readouterr().err
