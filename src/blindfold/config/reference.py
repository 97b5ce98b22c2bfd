"""Render the configuration reference (docs/config.md's tables) from the schema itself, so the
documentation cannot drift from the code. `python -m blindfold.config.reference` prints it."""

from __future__ import annotations

import json
from typing import Any

from blindfold.config import Config
from blindfold.config.schema import REQUIRED, iter_documented

BEGIN = "<!-- BEGIN GENERATED REFERENCE (python -m blindfold.config.reference) -->"
END = "<!-- END GENERATED REFERENCE -->"


def _default(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, tuple):
        return "`[]`" if not value else f"`{json.dumps(list(value))}`"
    return f"`{json.dumps(value)}`"


def render() -> str:
    """Markdown: one section per top-level table, one key table per (nested) table."""
    tables: dict[str, list[tuple[str, str, str, Any]]] = {}
    sections: list[tuple[str, str]] = []
    arrays = {
        key
        for key, type_text, _d, _v in iter_documented(Config)
        if type_text.startswith("a list of tables")
    }
    for key, type_text, doc, default in iter_documented(Config):
        if "." not in key:
            sections.append((key, doc))
            continue
        parent = key.rsplit(".", 1)[0]
        tables.setdefault(parent, []).append((key, type_text, doc, default))
    out = [BEGIN, ""]
    for section, doc in sections:
        out += [f"### `[{section}]`", "", doc, ""]
        for parent, rows in tables.items():
            if parent != section and not parent.startswith(section + "."):
                continue
            if parent != section:
                out += [f"#### `[[{parent}]]`" if parent in arrays else f"#### `[{parent}]`", ""]
            out += ["| key | type | default | meaning |", "|---|---|---|---|"]
            for key, type_text, text, default in rows:
                is_table = "a table" in type_text or "a list of tables" in type_text
                shown = "tables, see below" if is_table else type_text.replace(" | ", " or ")
                if default is REQUIRED:
                    dflt = "required"
                elif default is None:
                    dflt = "none (optional table)" if is_table else "none"
                elif is_table and not isinstance(default, tuple):
                    dflt = "the defaults below"
                else:
                    dflt = _default(default)
                out.append(f"| `{key}` | {shown} | {dflt} | {text.replace('|', '/')} |")
            out.append("")
    out.append(END)
    return "\n".join(out)


def update(path: str) -> None:
    """Rewrite the generated part of `path` (between the markers) in place."""
    from pathlib import Path

    doc = Path(path).read_text()
    start, end = doc.index(BEGIN), doc.index(END) + len(END)
    Path(path).write_text(doc[:start] + render() + doc[end:])


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1:
        update(sys.argv[1])  # python -m blindfold.config.reference docs/config.md
    else:
        print(render())
