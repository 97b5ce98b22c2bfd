"""Run one tlsfuzzer script with two adjustments, so that the two servers compared get the same
test cases and blindfold's keyless route can be reached at all:

- `random` is seeded (TLSFUZZER_SEED, default 1): scripts that run a random sample of their
  cases (`-n`) pick the same sample against every server.
- With TLSFUZZER_SNI=<name>, every ClientHello whose script gives an extension list and no
  server_name gets a server_name extension for <name>, first in the list. tlsfuzzer sends no
  SNI by itself, and a keyless edge cannot have an SNI-less handshake signed (see README.md).
  A server may acknowledge SNI with an empty server_name in EncryptedExtensions (the keyless
  edge does, RFC 6066 §3); scripts that list the exact extensions they expect there would
  count that ack, caused by the added SNI, as unexpected, so it is dropped before their check.

    python fuzz_wrapper.py /path/to/tlsfuzzer/scripts/test-tls13-ccs.py -h 127.0.0.1 -p 4433
"""

from __future__ import annotations

import os
import random
import runpy
import sys


def add_sni(name: str) -> None:
    from tlsfuzzer import expect, messages
    from tlslite.constants import ExtensionType
    from tlslite.extensions import SNIExtension

    original = messages.ClientHelloGenerator.__init__

    def init(self, ciphers=None, extensions=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(extensions, dict) and ExtensionType.server_name not in extensions:
            sni = SNIExtension().create(bytearray(name, "ascii"))
            extensions = {ExtensionType.server_name: sni, **extensions}
        original(self, ciphers, extensions, *args, **kwargs)

    messages.ClientHelloGenerator.__init__ = init

    ee = expect.ExpectEncryptedExtensions
    compare = ee._compare_extensions_in_ee

    def compare_without_sni_ack(self, srv_exts, cln_hello):  # type: ignore[no-untyped-def]
        if (
            self.extensions is not None
            and ExtensionType.server_name not in self.extensions
            and srv_exts.extensions
        ):
            srv_exts.extensions = [
                e for e in srv_exts.extensions if e.extType != ExtensionType.server_name
            ]
        return compare(self, srv_exts, cln_hello)

    ee._compare_extensions_in_ee = compare_without_sni_ack


def main() -> None:
    script = os.path.abspath(sys.argv[1])
    sys.path.insert(0, os.path.dirname(os.path.dirname(script)))  # the tlsfuzzer checkout
    random.seed(int(os.environ.get("TLSFUZZER_SEED", "1")))
    name = os.environ.get("TLSFUZZER_SNI", "")
    if name:
        add_sni(name)
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
