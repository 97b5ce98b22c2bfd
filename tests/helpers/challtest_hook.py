"""A dns-01 hook for the tests: `challtest_hook.py URL set|clear NAME VALUE` sets or clears a
TXT record through pebble-challtestsrv's management API at URL. Exit 0 once done."""

from __future__ import annotations

import json
import sys
import urllib.request


def main(argv: list[str]) -> int:
    url, action, name, value = argv
    endpoint = "set-txt" if action == "set" else "clear-txt"
    body: dict[str, str] = {"host": name.rstrip(".") + "."}
    if action == "set":
        body["value"] = value
    req = urllib.request.Request(f"{url}/{endpoint}", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()
    print(f"{action} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
