"""The pebble runner (src/blindfold/demo/pebble.py) with the tests' dns-01 hook."""

from __future__ import annotations

import sys
from pathlib import Path

from blindfold.demo.pebble import Pebble as _Pebble
from blindfold.demo.pebble import have_pebble

__all__ = ["Pebble", "have_pebble"]

HOOK = Path(__file__).with_name("challtest_hook.py")


class Pebble(_Pebble):
    def hook_command(self) -> list[str]:
        """A dns-01 hook that sets the TXT record in challtestsrv."""
        return [sys.executable, str(HOOK), f"http://127.0.0.1:{self.challtest_port}"]
