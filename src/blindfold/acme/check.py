"""What `blindfold check-config` checks of an `[<component>.acme]` table beyond its schema:
the files that exist load, the hook can be started, the CA bundle loads. Nothing is sent to
the CA and nothing is written."""

from __future__ import annotations

import os
import shutil
import ssl
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from blindfold.config.acme import AcmeConfig
from blindfold.errors import ConfigError


def check_acme(cfg: AcmeConfig, where: str) -> None:
    """ConfigError naming the key (`where` is e.g. "origin.acme")."""
    if cfg.ca_bundle:
        try:
            ssl.create_default_context(cafile=cfg.ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{where}.ca_bundle", f"cannot load {cfg.ca_bundle}: {exc}") from None
    if cfg.challenge == "dns-01":
        cmd = cfg.dns_hook[0]
        found = shutil.which(cmd) if "/" not in cmd else (cmd if os.access(cmd, os.X_OK) else None)
        if found is None:
            raise ConfigError(f"{where}.dns_hook", f"{cmd!r} is not an executable command")
    keys = [(f"{where}.account_key", cfg.account_key)]
    keys += [(f"{where}.orders[{i}].key", o.key) for i, o in enumerate(cfg.orders)]
    for key, path in keys:
        p = Path(path)
        if not p.exists():
            if not p.parent.is_dir():
                raise ConfigError(key, f"{p.parent} does not exist (the key is created there)")
            continue
        try:
            serialization.load_pem_private_key(p.read_bytes(), None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(key, f"cannot load {path}: {exc}") from None
