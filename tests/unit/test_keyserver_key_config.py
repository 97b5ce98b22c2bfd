"""[[keyserver.keys]]: a key is a PEM file or a PKCS#11 token key, never both or neither; the
errors name the key."""

from __future__ import annotations

import pytest

from blindfold.config import loads
from blindfold.errors import ConfigError

HEAD = """[keyserver]
listen = "127.0.0.1:1"
cert = "c"
key = "k"
client_ca = "ca"
audit_log = "a"
audit_key = "ak"
"""
PKCS11 = 'pkcs11 = { module = "/usr/lib/x.so", token_label = "t", key_label = "k", pin_file = "p" }'


def test_a_token_key_loads() -> None:
    cfg = loads(HEAD + f'[[keyserver.keys]]\ncertificate = "c.pem"\n{PKCS11}\n').keyserver
    assert cfg is not None
    p = cfg.keys[0].pkcs11
    assert p is not None and (p.key_label, p.sessions) == ("k", 1)
    assert cfg.reload_interval_s == 1.0 and cfg.previous_certificate_grace_s == 60.0


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ('certificate = "c.pem"\nkey = "k.pem"\n' + PKCS11, "keyserver.keys[0].key"),
        ('certificate = "c.pem"\n', "keyserver.keys[0].key"),
        (
            'certificate = "c.pem"\n' + PKCS11.replace('"/usr/lib/x.so"', '"x.so"'),
            "keyserver.keys[0].pkcs11.module",
        ),
        (
            'certificate = "c.pem"\n' + PKCS11.replace("}", ", sessions = 0 }"),
            "keyserver.keys[0].pkcs11.sessions",
        ),
        (
            'certificate = "c.pem"\n' + PKCS11.replace("}", ", slot = 1 }"),
            "keyserver.keys[0].pkcs11.slot",
        ),
    ],
)
def test_bad_key_tables_name_the_key(table: str, where: str) -> None:
    with pytest.raises(ConfigError) as bad:
        loads(HEAD + "[[keyserver.keys]]\n" + table + "\n")
    assert where in str(bad.value)
