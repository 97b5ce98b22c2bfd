"""The configuration keys of the second attack review's fixes (atk-trust): the edges' own
counter names on Redis, the origin's edges, PROXY header authentication, the decision
stream's per-edge limits. Errors name the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from blindfold.config import loads
from blindfold.errors import ConfigError
from tests.unit.test_config import GOOD

REDIS = "\n[edge.decisions]\nsigner_public_keys = ['p']\n"


@pytest.mark.parametrize(
    ("decisions", "name", "peers"),
    [
        ("redis_url = 'redis://127.0.0.1/0'", "default", ()),
        ("redis_url = 'rediss://edge1:pw@redis.internal/0'", "edge1", ()),
        (
            "redis_url = 'rediss://edge1:pw@redis.internal/0'\n"
            "rate_redis_url = 'rediss://e-7:pw@counters.internal/0'\nrate_peers = ['edge2', 'e-7']",
            "e-7",
            ("edge2", "e-7"),
        ),
        ("redis_url = 'rediss://u%2Fx:pw@r.internal/0'\nrate_name = 'edge4'", "edge4", ()),
    ],
)
def test_an_edges_counter_name(decisions: str, name: str, peers: tuple[str, ...]) -> None:
    cfg = loads(GOOD + REDIS + decisions + "\n").edge
    assert cfg is not None and cfg.decisions is not None
    assert cfg.decisions.counter_name == name
    assert cfg.decisions.rate_peers == peers


@pytest.mark.parametrize(
    ("decisions", "key", "words"),
    [
        ("redis_url = 'rediss://a%3Ab:pw@r.internal/0'", "rate_name", "user name"),
        ("redis_url = 'redis://127.0.0.1/0'\nrate_name = 'edge*'", "rate_name", "letters"),
        ("redis_url = 'redis://127.0.0.1/0'\nrate_peers = ['ok', 'a:b']", "rate_peers[1]", "'.'"),
        ("rate_peers = ['edge2']", "redis_url", "shared counters"),
        (
            "redis_url = 'redis://127.0.0.1/0'\nrate_redis_url = 'redis://10.0.0.1/0'",
            "rate_redis_url",
            "TLS",
        ),
    ],
)
def test_counter_settings_errors_name_the_key(decisions: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(GOOD + REDIS + decisions + "\n")
    assert info.value.key == f"edge.decisions.{key}", str(info.value)
    assert words in str(info.value)


ORIGIN = """
[origin]
upstream = "http://127.0.0.1:8080"
listen = []
proxy_protocol = "required"
"""
EDGE1 = "\n[[origin.edges]]\nname = 'edge1'\naddresses = ['192.0.2.10/32']\n"


def test_origin_edges_are_trusted_edges_with_names() -> None:
    cfg = loads(ORIGIN + EDGE1 + "proxy_auth_key_file = '/k'\n").origin
    assert cfg is not None and cfg.edges[0].name == "edge1" and not cfg.trusted_edges
    assert cfg.decisions.per_edge_decisions == 100 and cfg.proxy_auth_max_skew_s == 30


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        (ORIGIN, "origin.trusted_edges", "addresses"),
        (ORIGIN + EDGE1 + EDGE1, "origin.edges", "unique"),
        (ORIGIN + EDGE1.replace("edge1", "edge:1"), "origin.edges[0].name", "letters"),
        (ORIGIN + EDGE1.replace("'192.0.2.10/32'", ""), "origin.edges[0].addresses", "empty"),
        (
            ORIGIN + EDGE1.replace("192.0.2.10/32", "0.0.0.0/0"),
            "origin.edges[0].addresses[0]",
            "every",
        ),
        (
            ORIGIN.replace('"required"', '"off"') + EDGE1 + "proxy_auth_key_file = '/k'\n",
            "origin.proxy_protocol",
            "authenticated",
        ),
        (
            ORIGIN + EDGE1 + "\n[origin.decisions]\nper_edge_decisions = 0\n",
            "origin.decisions.per_edge_decisions",
            ">=",
        ),
        (
            ORIGIN + EDGE1 + "\n[origin.decisions]\nrequest_timeout_s = 0\n",
            "origin.decisions.request_timeout_s",
            ">=",
        ),
    ],
)
def test_origin_settings_errors_name_the_key(text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(text)
    assert info.value.key == key, str(info.value)
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("route", "key"),
    [
        ("proxy_auth_name = 'edge1'", "proxy_auth_key_file"),
        ("proxy_auth_key_file = '/k'", "proxy_auth_name"),
        ("proxy_auth_name = 'a b'\nproxy_auth_key_file = '/k'", "proxy_auth_name"),
    ],
)
def test_edge_route_auth_errors_name_the_key(route: str, key: str) -> None:
    text = GOOD.replace('proxy_protocol = "v2"\n', f'proxy_protocol = "v2"\n{route}\n')
    with pytest.raises(ConfigError) as info:
        loads(text)
    assert info.value.key == f"edge.routes[0].{key}", str(info.value)
    with pytest.raises(ConfigError) as info:
        loads(
            GOOD.replace(
                'proxy_protocol = "v2"\n',
                "proxy_protocol = 'v1'\nproxy_auth_name = 'e'\nproxy_auth_key_file = '/k'\n",
            )
        )
    assert info.value.key == "edge.routes[0].proxy_protocol"


def test_check_config_loads_the_proxy_auth_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from blindfold.cli.main import main

    bad = tmp_path / "bad.key"
    bad.write_text("00" * 8)
    good = tmp_path / "good.key"
    good.write_text("ab" * 32)
    for text, key in (
        (
            GOOD.replace(
                'proxy_protocol = "v2"\n',
                "proxy_protocol = 'v2'\nproxy_auth_name = 'e'\nproxy_auth_key_file = '{}'\n",
            ),
            "edge.routes[0].proxy_auth_key_file",
        ),
        (
            ORIGIN.replace("listen = []", "listen = []") + EDGE1 + "proxy_auth_key_file = '{}'\n",
            "origin.edges[0].proxy_auth_key_file",
        ),
    ):
        path = tmp_path / "c.toml"
        path.write_text(text.format(bad))
        assert main(["check-config", str(path)]) == 2
        assert key in capsys.readouterr().err
        path.write_text(text.format(good))
        assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
