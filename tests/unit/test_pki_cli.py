"""`blindfold pki`: keys are never silently replaced, and never readable by others (issue 15
finding 14)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from blindfold.cli.main import main


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)  # the most permissive umask: the mode must come from the code
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_written_0600(tmp_path: Path, open_umask: None) -> None:
    assert main(["pki", "ca", str(tmp_path)]) == 0
    assert main(["pki", "edge", "e1", str(tmp_path)]) == 0
    assert main(["pki", "server", "s1", str(tmp_path), "--host", "s.test"]) == 0
    for key in ("ca.key", "e1.key", "s1.key"):
        assert _mode(tmp_path / key) == 0o600, key
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


@pytest.mark.parametrize(("what", "extra"), [("edge", []), ("server", ["--host", "s.test"])])
def test_an_existing_key_is_kept_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str, extra: list[str]
) -> None:
    assert main(["pki", "ca", str(tmp_path)]) == 0
    assert main(["pki", what, "n", str(tmp_path), *extra]) == 0
    key = tmp_path / "n.key"
    first = key.read_bytes()
    capsys.readouterr()
    assert main(["pki", what, "n", str(tmp_path), *extra]) == 2
    assert key.read_bytes() == first
    assert "exists" in capsys.readouterr().err
    key.chmod(0o644)  # a key someone loosened
    assert main(["pki", what, "n", str(tmp_path), *extra, "--force"]) == 0
    assert key.read_bytes() != first and _mode(key) == 0o600


def test_the_ca_is_kept_unless_forced(tmp_path: Path) -> None:
    assert main(["pki", "ca", str(tmp_path)]) == 0
    first = (tmp_path / "ca.key").read_bytes()
    assert main(["pki", "ca", str(tmp_path)]) == 2
    assert (tmp_path / "ca.key").read_bytes() == first
    assert main(["pki", "ca", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "ca.key").read_bytes() != first


def test_api_keys_are_written_0600_and_never_silently_replaced(
    tmp_path: Path, open_umask: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from blindfold.decisions.api import load_api_keys

    assert main(["pki", "api-key", "edge1", str(tmp_path)]) == 0
    assert main(["pki", "api-key", "edge2", str(tmp_path)]) == 0
    keys = load_api_keys(str(tmp_path / "api-keys.txt"))  # what the origin agent reads
    assert set(keys) == {"edge1", "edge2"}
    assert keys["edge1"] == (tmp_path / "edge1.api-key").read_text().strip().encode()
    for name in ("api-keys.txt", "edge1.api-key", "edge2.api-key"):
        assert _mode(tmp_path / name) == 0o600, name
    first = keys["edge1"]
    assert main(["pki", "api-key", "edge1", str(tmp_path)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["pki", "api-key", "edge1", str(tmp_path), "--force"]) == 0
    keys = load_api_keys(str(tmp_path / "api-keys.txt"))
    assert set(keys) == {"edge1", "edge2"} and keys["edge1"] != first
    assert main(["pki", "api-key", "bad name", str(tmp_path)]) == 2


def test_help_says_that_host_repeats_and_names_the_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["pki", "server", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "repeat it for several" in out and "(default: ec256)" in out
    with pytest.raises(SystemExit):
        main(["check-config", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Exit 0" in out and "2 naming the key" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "blind routes" in " ".join(capsys.readouterr().out.split())
