"""Configuration: valid files load into frozen dataclasses; every error names its key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from blindfold.cli.main import main
from blindfold.config import Config, loads, reference
from blindfold.config.schema import iter_documented
from blindfold.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
[edge]
listen = ["127.0.0.1:8443", "[::1]:8443"]
admin_listen = "127.0.0.1:7743"

[[edge.routes]]
sni = ["example.test", "*.example.test"]
mode = "passthrough"
origins = ["127.0.0.1:9443", "origin.internal:443"]
proxy_protocol = "v2"

[[edge.ja4_rules]]
prefix = "t12"
action = "rate_limit"
rate_per_s = 5
"""


def test_good_config() -> None:
    cfg = loads(GOOD)
    assert cfg.edge is not None
    assert cfg.edge.listen == ("127.0.0.1:8443", "[::1]:8443")
    assert cfg.edge.routes[0].proxy_protocol == "v2"
    assert cfg.edge.ja4_rules[0].rate_per_s == 5.0  # ints accepted for floats
    assert cfg.edge.hello_timeout_s == 5.0 and cfg.edge.max_hello_bytes == 16384
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.edge.workers = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ("[edge]\nbogus = 1\n", "edge.bogus", "unknown key"),
        ("[edge]\nworkers = 'two'\n", "edge.workers", "integer"),
        ("[edge]\nworkers = 1.5\n", "edge.workers", "integer"),
        ("[edge]\nhello_timeout_s = -1\n", "edge.hello_timeout_s", ">="),
        ("[edge]\nper_ip_concurrent = true\n", "edge.per_ip_concurrent", "integer"),
        ("[edge]\nblock = ['10.0.0.0/33']\n", "edge.block[0]", "CIDR"),
        (
            "[[edge.routes]]\nsni=['A.test']\norigins=['127.0.0.1:1']\n",
            "edge.routes[1].sni[0]",
            "lower case",
        ),
        (
            "[[edge.routes]]\nsni=['a.test']\norigins=['127.0.0.1:1']\nmode='magic'\n",
            "edge.routes[1].mode",
            "passthrough",
        ),
        (
            "[[edge.routes]]\nsni=['a.test']\norigins=['127.0.0.1:1']\nmode='blind'\n",
            "edge.routes[1].certificate",
            "own certificate and key",
        ),
        (
            "[[edge.routes]]\nsni=['a.test']\norigins=['127.0.0.1:1']\nmode='blind'\n"
            "certificate='c.pem'\nkey='k.pem'\norigin_ca='ca.pem'\n",
            "edge.routes[1].origin_server_name",
            "CDN hostname",
        ),
        (
            "[[edge.routes]]\nsni=['a.test']\norigins=['127.0.0.1:1']\nkey='k.pem'\n",
            "edge.routes[1].key",
            "only for mode = 'blind'",
        ),
        (
            "[[edge.routes]]\nsni=['a.test']\norigins=['127.0.0.1:0']\n",
            "edge.routes[1].origins[0]",
            "port 0",
        ),
        (
            "[[edge.routes]]\nsni=['example.test']\norigins=['127.0.0.1:1']\n",
            "edge.routes[1].sni",
            "already served",
        ),
        (
            "[[edge.routes]]\nsni=['b.test']\norigins=['127.0.0.1:1']\nproxy_protocol='v3'\n",
            "edge.routes[1].proxy_protocol",
            "'v2'",
        ),
        ("[[edge.ja4_rules]]\naction='block'\n", "edge.ja4_rules[1].ja4", "exactly one"),
        ("[[edge.routes]]\norigins=['127.0.0.1:1']\n", "edge.routes[1].sni", "required"),
        (
            "[[edge.routes]]\nsni=['k.test']\norigins=['127.0.0.1:1']\nmode='keyless'\n",
            "edge.routes[1].certificate",
            "no key",
        ),
        (
            "[[edge.routes]]\nsni=['k.test']\norigins=['127.0.0.1:1']\nmode='keyless'\n"
            "certificate='c.pem'\n",
            "edge.routes[1].keyserver",
            "key servers",
        ),
        (
            "[[edge.routes]]\nsni=['k.test']\norigins=['127.0.0.1:1']\nmode='keyless'\n"
            "certificate='c.pem'\nkeyserver={addresses=['127.0.0.1:7'], client_cert='e.pem', "
            "client_key='e.key', ca='ca.pem'}\n",
            "edge.routes[1].origin_ca",
            "verified TLS",
        ),
        (
            "[[edge.routes]]\nsni=['k.test']\norigins=['127.0.0.1:1']\nmode='keyless'\n"
            "certificate='c.pem'\norigin_pin_sha256=['abcd']\nkeyserver={addresses=['127.0.0.1:7'],"
            " client_cert='e.pem', client_key='e.key', ca='ca.pem'}\n",
            "edge.routes[1].origin_pin_sha256[0]",
            "64 hex",
        ),
        (
            "[[edge.routes]]\nsni=['k.test']\norigins=['127.0.0.1:1']\n"
            "rate_limits=[{rate_per_s=1, burst=1}]\n",
            "edge.routes[1].rate_limits",
            "keyless",
        ),
        (
            "[[edge.routes]]\nsni=['k.test']\norigins=['127.0.0.1:1']\ncertificate='c.pem'\n",
            "edge.routes[1].certificate",
            "only for mode",
        ),
    ],
)
def test_errors_name_the_key(change: str, key: str, words: str) -> None:
    text = GOOD + "\n" + change
    if change.startswith("[edge]"):  # merge into the existing [edge] table
        text = GOOD.replace("[edge]\n", change, 1)
    with pytest.raises(ConfigError) as info:
        loads(text)
    assert info.value.key == key, str(info.value)
    assert words in str(info.value)


def test_bad_listen_address() -> None:
    with pytest.raises(ConfigError) as info:
        loads(GOOD.replace('"[::1]:8443"', '"::1:8443"'))
    assert info.value.key == "edge.listen[1]"
    assert "[addr]:port" in str(info.value)


def test_unknown_top_level_section() -> None:
    with pytest.raises(ConfigError) as info:
        loads("[edgy]\nx=1\n")
    assert info.value.key == "edgy"


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    assert main(["check-config", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace('proxy_protocol = "v2"', 'proxy_protocol = "v9"'))
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "edge.routes[0].proxy_protocol" in err and "'v2'" in err
    missing = tmp_path / "lists.toml"
    missing.write_text(GOOD.replace("[edge]\n", "[edge]\nblocklist_files = ['/nonexistent']\n"))
    assert main(["check-config", str(missing)]) == 2
    assert "edge.blocklist_files[0]" in capsys.readouterr().err
    assert main(["check-config", str(tmp_path / "absent.toml")]) == 2


def test_check_config_loads_blind_route_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from blindfold import pki

    ca = pki.make_ca()
    ca.write(tmp_path / "ca.pem")
    pki.issue(ca, ["cdn.test"]).write(tmp_path / "cdn.pem", tmp_path / "cdn.key")
    from blindfold.blind.sealer import load_signing_key

    key = load_signing_key(str(tmp_path / "manifest.pem"), create=True).public_key()
    (tmp_path / "manifest-public.pem").write_bytes(
        key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    route = (
        "[edge]\nlisten = ['127.0.0.1:8443']\n[[edge.routes]]\nsni = ['cdn.test']\n"
        "origins = ['127.0.0.1:9443']\nmode = 'blind'\norigin_server_name = 'o.test'\n"
        f"origin_ca = '{tmp_path / 'ca.pem'}'\ncertificate = '{tmp_path / 'cdn.pem'}'\n"
        f"blind = {{ manifest_public_key = '{tmp_path / 'manifest-public.pem'}' }}\n"
    )
    good = tmp_path / "blind.toml"
    good.write_text(route + f"key = '{tmp_path / 'cdn.key'}'\n")
    assert main(["check-config", str(good)]) == 0
    bad = tmp_path / "blind-bad.toml"
    bad.write_text(route + f"key = '{tmp_path / 'ca.pem'}'\n")  # not the certificate's key
    assert main(["check-config", str(bad)]) == 2
    assert "edge.routes[0].certificate" in capsys.readouterr().err
    bad.write_text(
        route.replace("manifest-public.pem", "cdn.pem") + f"key = '{tmp_path / 'cdn.key'}'\n"
    )
    assert main(["check-config", str(bad)]) == 2  # the site's manifest key is not a key
    assert "edge.routes[0].blind.manifest_public_key" in capsys.readouterr().err


def test_check_config_loads_the_blind_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from blindfold.blind.sealer import load_id_secret, load_signing_key, seal_tree

    cfg = tmp_path / "origin.toml"
    cfg.write_text(
        "[origin]\nupstream = 'http://127.0.0.1:8080'\nlisten = []\n"
        "proxy_protocol = 'off'\n[origin.waf]\nenabled = false\n"
        f"[origin.blind]\ndir = '{tmp_path / 'sealed'}'\nsite_names = ['example.test']\n"
        "edge_url = 'https://cdn.test'\n"
    )
    assert main(["check-config", str(cfg)]) == 2  # not sealed yet: no manifest key
    assert "blind.dir" in capsys.readouterr().err
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a.js").write_text("1")
    seal_tree(
        str(tmp_path / "www"),
        str(tmp_path / "sealed"),
        load_signing_key(str(tmp_path / "k.pem"), create=True),
        load_id_secret(str(tmp_path / "s"), create=True),
    )
    assert main(["check-config", str(cfg)]) == 0


def test_every_key_is_documented() -> None:
    doc = (ROOT / "docs" / "config.md").read_text()
    for key, _type, help_text, _default in iter_documented(Config):
        assert help_text, f"{key} has no doc string in the schema"
    start, end = doc.index(reference.BEGIN), doc.index(reference.END) + len(reference.END)
    assert doc[start:end] == reference.render(), (
        "docs/config.md is out of date: regenerate its reference with "
        "python -m blindfold.config.reference docs/config.md"
    )
    documented = set(re.findall(r"`\[*([a-z0-9_.]+)\]*`", doc))
    for key, *_ in iter_documented(Config):
        assert key in documented, key


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False)
        | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["listen", "routes", "sni", "origins", "workers", "mode", "x"]),
                inner,
                max_size=3,
            )
        ),
        max_leaves=10,
    )
)
def test_any_table_loads_or_raises_config_error(value: object) -> None:
    from blindfold.config.schema import build

    try:
        build(Config, {"edge": value})
    except ConfigError:
        pass


def test_documented_examples_are_valid() -> None:
    """The TOML examples in docs/config.md, docs/decisions.md and the README load as they
    are."""
    origin_head = "[origin]\nupstream = 'http://127.0.0.1:1'\nlisten = []\nproxy_protocol = 'off'\n"
    for doc in (ROOT / "docs" / "config.md", ROOT / "docs" / "decisions.md", ROOT / "README.md"):
        blocks = re.findall(r"```toml\n(.*?)```", doc.read_text(), re.S)
        assert blocks, doc
        edge_head = (
            "[edge]\nlisten = ['127.0.0.1:1']\n[[edge.routes]]\nsni = ['a.test']\n"
            "origins = ['127.0.0.1:2']\n"
        )
        for block in blocks:
            if "[origin]" in block:
                pass  # complete as it is
            elif block.startswith(("[origin.", "[[origin.")):  # a fragment of the origin's
                block = origin_head + block
            elif "[edge]" not in block:  # an [edge.decisions] fragment
                block = edge_head + block
            elif "[[edge.routes]]" not in block:  # a fragment: add the required keys
                block = block.replace("[edge]", "[edge]\nlisten = ['127.0.0.1:1']", 1)
                block += "\n[[edge.routes]]\nsni = ['a.test']\norigins = ['127.0.0.1:2']\n"
            try:
                loads(block)
            except ConfigError as exc:
                raise AssertionError(f"{doc.name}: {exc}\n{block}") from None
    readme = (ROOT / "README.md").read_text()
    for name in ("edge", "origin", "edge-keyless", "keyserver"):
        example = re.search(rf"cat > /tmp/{name}.toml <<'?EOF'?\n(.*?)\nEOF", readme, re.S)
        assert example is not None, name
        # the shell fills in the edge's fingerprint when the example runs
        loads(re.sub(r'"\$\(openssl[^"]*"', '"' + "ab" * 32 + '"', example.group(1)))


def test_admin_ports_default_outside_prometheus_allocations(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The admin listeners' default ports must not be one a monitoring host already uses:
    Prometheus' own (9090-9094) and its exporters' allocations (7743-9999, node_exporter at
    7743, all taken since 2023; newer exporters from 10000 on). The three differ, so that an
    origin agent and a key server can share a host."""
    from blindfold.config.edge import EdgeConfig
    from blindfold.config.keyserver import KeyServerConfig
    from blindfold.config.origin import OriginConfig

    ports = []
    for cls in (EdgeConfig, OriginConfig, KeyServerConfig):
        default = next(f for f in dataclasses.fields(cls) if f.name == "admin_listen").default
        assert isinstance(default, str) and default.startswith("127.0.0.1:"), cls
        ports.append(int(default.rpartition(":")[2]))
    for port in ports:
        assert not 9090 <= port <= 10100, f"{port} collides with Prometheus' port allocations"
        assert port < 32768, f"{port} is in Linux's ephemeral range"
    assert len(set(ports)) == 3
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    demo_admin = re.search(r"edge admin port \(default (\d+)\)", capsys.readouterr().out)
    assert demo_admin is not None and int(demo_admin[1]) == ports[0]


ORIGIN = """
[origin]
upstream = "http://127.0.0.1:8080"
listen = []
proxy_protocol = "off"
"""


@pytest.mark.parametrize(
    ("decisions", "key", "words"),
    [
        # a prefix check let these through: 127.0.0.1.evil.test is not loopback
        ("url = 'http://127.0.0.1.evil.test/'\napi_key_file='k'", "url", "https"),
        ("url = 'http://10.0.0.1:8089'\napi_key_file='k'", "url", "https"),
        ("url = 'ftp://origin.test'\napi_key_file='k'", "url", "https://"),
        ("url = 'https://origin.test:99999'\napi_key_file='k'", "url", "Port"),
        ("redis_url = 'redis://10.0.0.5:6379/0'\nsigner_public_keys=['p']", "redis_url", "rediss"),
        ("redis_url = 'redis://redis.internal/0'\nsigner_public_keys=['p']", "redis_url", "TLS"),
        ("redis_url = 'redis://127.0.0.1:6379/0'", "signer_public_keys", "signed"),
        ("min_ban_prefix_len_v4 = 33", "min_ban_prefix_len_v4", "<="),
        ("max_bans = 0", "max_bans", ">="),
    ],
)
def test_decision_source_errors_name_the_key(decisions: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(GOOD + "\n[edge.decisions]\n" + decisions + "\n")
    assert info.value.key == f"edge.decisions.{key}", str(info.value)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "decisions",
    [
        "url = 'http://127.0.0.1:8089'\napi_key_file='k'",
        "url = 'http://[::1]:8089'\napi_key_file='k'",
        "url = 'https://origin.test'\napi_key_file='k'",
        "redis_url = 'rediss://edge1:pw@redis.internal:6380/0'\nsigner_public_keys=['p']",
        "redis_url = 'redis://127.0.0.1:6379/0'\nsigner_public_keys=['p']",
        "redis_url = 'unix:///run/redis.sock'\nsigner_public_keys=['p']",
    ],
)
def test_decision_sources_that_are_accepted(decisions: str) -> None:
    assert loads(GOOD + "\n[edge.decisions]\n" + decisions + "\n").edge is not None


def test_ban_limits_and_ipv6_prefixes_must_agree() -> None:
    with pytest.raises(ConfigError) as info:
        loads(
            GOOD.replace("[edge]\n", "[edge]\nipv6_prefix_len = 48\n", 1)
            + "\n[edge.decisions]\nmin_ban_prefix_len_v6 = 56\n"
        )
    assert info.value.key == "edge.decisions.min_ban_prefix_len_v6"
    with pytest.raises(ConfigError) as info:
        loads(GOOD + ORIGIN + "[origin.decisions]\nipv6_prefix_len = 56\n")
    assert info.value.key == "origin.decisions.ipv6_prefix_len"
    assert "edge.ipv6_prefix_len is 64" in str(info.value)
    with pytest.raises(ConfigError) as info:
        loads(ORIGIN + "[origin.decisions]\nredis_url = 'redis://127.0.0.1/0'\n")
    assert info.value.key == "origin.decisions.signing_key"
    with pytest.raises(ConfigError) as info:
        loads(ORIGIN + "[origin.decisions]\nredis_url = 'redis://192.0.2.1/0'\nsigning_key='k'\n")
    assert info.value.key == "origin.decisions.redis_url"


def test_check_config_loads_the_decision_signing_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    not_ed25519 = tmp_path / "p256.pub"
    not_ed25519.write_bytes(
        generate_private_key(SECP256R1())
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    edge = tmp_path / "edge.toml"
    edge.write_text(
        GOOD + f"\n[edge.decisions]\nredis_url = 'redis://127.0.0.1/0'\n"
        f"signer_public_keys = ['{not_ed25519}']\n"
    )
    assert main(["check-config", str(edge)]) == 2
    err = capsys.readouterr().err
    assert "edge.decisions.signer_public_keys[0]" in err and "Ed25519" in err
    origin = tmp_path / "origin.toml"
    origin.write_text(
        ORIGIN + "[origin.decisions]\nredis_url = 'redis://127.0.0.1/0'\n"
        f"signing_key = '{tmp_path / 'absent.key'}'\n"
    )
    assert main(["check-config", str(origin)]) == 2
    assert "origin.decisions.signing_key" in capsys.readouterr().err


def test_origin_and_edge_routes_share_the_http_server_settings() -> None:
    """One table of HTTP server settings (config.http) under `origin.http` and every edge
    route's `http`, one mapping to the HTTP layer's bounds: a setting named like a bound
    reaches it, the same way for both."""
    import dataclasses

    from blindfold.config.edge import EdgeHttpConfig
    from blindfold.config.http import HttpServerConfig
    from blindfold.config.origin import HttpConfig
    from blindfold.web.limits import HttpLimits

    server = {f.name for f in dataclasses.fields(HttpServerConfig)}
    for cls in (EdgeHttpConfig, HttpConfig):
        assert issubclass(cls, HttpServerConfig)
        extra = {f.name for f in dataclasses.fields(cls)} - server
        assert all(name.startswith("upstream_") for name in extra), extra  # their own upstream
    bounds = {f.name for f in dataclasses.fields(HttpLimits)}
    values = {}
    for i, name in enumerate(sorted(server & bounds)):
        field = next(f for f in dataclasses.fields(HttpServerConfig) if f.name == name)
        values[name] = field.default + (i + 1) if isinstance(field.default, int) else 99.5 + i
    text = (
        '[edge]\nlisten = ["127.0.0.1:443"]\n[[edge.routes]]\nsni = ["a.test"]\n'
        'origins = ["127.0.0.1:9"]\nhttp = { '
        + ", ".join(f"{k} = {v}" for k, v in values.items())
        + " }\n[origin]\nupstream = 'http://127.0.0.1:8080'\nlisten = []\n"
        "proxy_protocol = 'off'\n[origin.http]\n"
        + "".join(f"{k} = {v}\n" for k, v in values.items())
    )
    config = loads(text)
    assert config.edge is not None and config.origin is not None
    edge_http = config.edge.routes[0].http
    assert edge_http is not None
    for limits in (edge_http.limits(), config.origin.http.limits()):
        for name, value in values.items():
            assert getattr(limits, name) == value, name
        assert limits.h2_max_header_list_size == values["max_header_bytes"]
    assert edge_http.limits(max_body_bytes=0).max_body_bytes == 0
