"""[origin.quic]: errors name the dotted key; key files are checked at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from blindfold.config import loads
from blindfold.errors import ConfigError
from blindfold.origin.h3 import load_bindings

BASE = """
[origin]
upstream = "http://127.0.0.1:8080"
listen = []
trusted_edges = ["192.0.2.0/24"]
proxy_protocol = "required"
"""
CERT = '\n[[origin.certificates]]\ncert = "c.pem"\nkey = "k.pem"\n'


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text)
    return info.value


def test_quic_needs_certificates_and_edge_keys() -> None:
    assert error(BASE + '[origin.quic]\nlisten = ["127.0.0.1:0"]\n').key == "origin.quic.listen"
    err = error(BASE + CERT + '[origin.quic]\nlisten = ["127.0.0.1:0"]\n')
    assert err.key == "origin.quic.edge_keys" and "openssl rand -hex 32" in str(err)


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('listen = ["nowhere"]', "origin.quic.listen"),
        ("advertise_port = 70000", "origin.quic.advertise_port"),
        ("announcement_window_s = 0", "origin.quic.announcement_window_s"),
        ("spin_bit = true", "origin.quic.spin_bit"),
    ],
)
def test_bad_values_name_the_key(body: str, key: str) -> None:
    assert error(BASE + CERT + "[origin.quic]\n" + body + "\n").key.startswith(key)


def test_a_good_quic_section(tmp_path: Path) -> None:
    keyfile = tmp_path / "edge.key"
    keyfile.write_text("ab" * 32 + "\n")
    cfg = loads(
        BASE + CERT + f'[origin.quic]\nlisten = ["127.0.0.1:0"]\nedge_keys = ["{keyfile}"]\n'
    ).origin
    assert cfg is not None and cfg.quic.advertise and cfg.quic.idle_timeout_s == 30.0
    assert len(load_bindings(cfg).keys) == 1


@pytest.mark.parametrize(
    ("content", "words"),
    [(None, "cannot read"), ("not hex", "not hex"), ("ab" * 16, "at least 32")],
)
def test_key_files_are_checked(tmp_path: Path, content: str | None, words: str) -> None:
    keyfile = tmp_path / "edge.key"
    if content is not None:
        keyfile.write_text(content)
    cfg = loads(
        BASE + CERT + f'[origin.quic]\nlisten = ["127.0.0.1:0"]\nedge_keys = ["{keyfile}"]\n'
    ).origin
    assert cfg is not None
    with pytest.raises(ConfigError) as info:
        load_bindings(cfg)
    assert info.value.key == "origin.quic.edge_keys[0]" and words in str(info.value)


EDGE = """
[edge]
listen = ["127.0.0.1:0"]
[[edge.routes]]
sni = ["a.test"]
origins = ["127.0.0.1:1"]
"""


@pytest.mark.parametrize(
    ("route", "tail", "key", "words"),
    [
        ("quic = true\n", "", "edge.routes[0].quic", "[edge.quic]"),
        (
            'quic = true\nmode = "keyless"\n',
            '[edge.quic]\nannounce_key_file = "k"\n',
            "edge.routes[0].quic",
            "only for mode = 'passthrough'",
        ),
        ('quic_origins = ["127.0.0.1:2"]\n', "", "edge.routes[0].quic_origins", "quic = true"),
        ('quic = true\nquic_origins = ["nowhere"]\n', "", "edge.routes[0].quic_origins[0]", ""),
        ("quic = true\n", "[edge.quic]\nmax_flows = 10\n", "edge.quic.announce_key_file", ""),
        (
            "quic = true\n",
            '[edge.quic]\nannounce_key_file = "k"\nidle_timeout_s = 0\n',
            "edge.quic.idle_timeout_s",
            "",
        ),
    ],
)
def test_edge_quic_errors_name_the_key(route: str, tail: str, key: str, words: str) -> None:
    err = error(EDGE + route + tail)
    assert err.key == key and words in str(err)


def test_edge_quic_key_file_is_checked(tmp_path: Path) -> None:
    from blindfold.config.edge import EdgeConfig
    from blindfold.edge.modes import check_route

    text = EDGE + f'quic = true\n[edge.quic]\nannounce_key_file = "{tmp_path / "k"}"\n'
    config = loads(text).edge
    assert isinstance(config, EdgeConfig) and config.routes[0].quic
    with pytest.raises(ConfigError) as info:
        check_route("edge.routes[0]", config.routes[0], config)
    assert info.value.key == "edge.quic.announce_key_file"
    (tmp_path / "k").write_text("ab" * 32 + "\n")
    check_route("edge.routes[0]", config.routes[0], config)  # loads
