"""Shared fixtures: throwaway PKI, TLS origins, and an edge running as a real process."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from blindfold import pki

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ROOT = Path(__file__).resolve().parent.parent
DECISIONS_NAME = "decisions.internal"  # the name in the decision stream's certificate
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def ca() -> pki.Issued:
    return pki.make_ca("blindfold test CA")


@pytest.fixture(scope="session")
def site(ca: pki.Issued, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Certificates for the test hostnames, on disk: the origin's real key lives here."""
    d = tmp_path_factory.mktemp("pki")
    ca.write(d / "ca.pem")
    leaf = pki.issue(ca, ["example.test", "*.example.test", "other.test", "localhost", "127.0.0.1"])
    leaf.write(d / "site.pem", d / "site.key")
    (d / "site.fp").write_text(pki.fingerprint_sha256(leaf.cert))
    # the origin's decision stream has a certificate of its own, naming none of the site's names
    pki.issue(ca, [DECISIONS_NAME]).write(d / "decisions.pem", d / "decisions.key")
    return {
        "dir": d,
        "ca": d / "ca.pem",
        "cert": d / "site.pem",
        "key": d / "site.key",
        "fingerprint": d / "site.fp",
        "decisions_cert": d / "decisions.pem",
        "decisions_key": d / "decisions.key",
    }


def need(tool: str) -> str:
    path = shutil.which(tool) or (
        f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None
    )
    if path is None:
        pytest.fail(
            f"{tool} is not installed: run scripts/bootstrap (the README's test command does)"
        )
    return path
