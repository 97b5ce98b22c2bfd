"""Rewriting a page for Subresource Integrity (sans-IO): `<script src>` and `<link
rel=stylesheet href>` that name a file published with `blindfold seal --sri` are pointed at
the edge's copy, with `integrity` and `crossorigin="anonymous"` (W3C SRI). Everything else in
the document is left byte for byte as it was.

html.parser (the standard library's HTML tokenizer) finds the tags; only their text is
replaced, so the rewrite cannot reformat or drop anything it does not understand."""

from __future__ import annotations

import html
import posixpath
import urllib.parse
from dataclasses import dataclass
from html.parser import HTMLParser

INTEGRITY_POLICY = b"blocked-destinations=(script)"  # W3C SRI: Integrity-Policy header


@dataclass(frozen=True, slots=True)
class Published:
    url: str  # absolute URL of the edge copy
    integrity: str  # "sha384-..."


class _Finder(HTMLParser):
    def __init__(self, text: str, page_path: str, files: dict[str, Published]) -> None:
        super().__init__(convert_charrefs=True)
        self.page_path = page_path
        self.files = files
        self.line_starts = [0]
        for i, ch in enumerate(text):
            if ch == "\n":
                self.line_starts.append(i + 1)
        self.edits: list[tuple[int, int, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {k: v for k, v in attrs}
        if tag == "script":
            attr = "src"
        elif tag == "link" and "stylesheet" in (names.get("rel") or "").lower().split():
            attr = "href"
        else:
            return
        target = self._resolve(names.get(attr))
        published = self.files.get(target) if target is not None else None
        if published is None:
            return
        raw = self.get_starttag_text() or ""
        line, col = self.getpos()
        start = self.line_starts[line - 1] + col
        kept = [(k, v) for k, v in attrs if k not in (attr, "integrity", "crossorigin")]
        kept += [
            (attr, published.url),
            ("integrity", published.integrity),
            ("crossorigin", "anonymous"),
        ]
        text = (
            "<"
            + tag
            + "".join(
                f" {k}" if v is None else f' {k}="{html.escape(v, quote=True)}"' for k, v in kept
            )
        )
        text += " />" if raw.endswith("/>") else ">"
        self.edits.append((start, start + len(raw), text))

    def _resolve(self, ref: str | None) -> str | None:
        if not ref:
            return None
        parts = urllib.parse.urlsplit(ref)
        if parts.scheme or parts.netloc or parts.query:
            return None
        joined = urllib.parse.urljoin(self.page_path, parts.path)
        return posixpath.normpath(joined) if joined.startswith("/") else None


def rewrite(page: str, page_path: str, files: dict[str, Published]) -> tuple[str, int]:
    """The page with its published scripts/stylesheets pointed at the edge; and how many."""
    finder = _Finder(page, page_path, files)
    finder.feed(page)
    finder.close()
    out = []
    last = 0
    for start, end, text in finder.edits:
        out.append(page[last:start])
        out.append(text)
        last = end
    out.append(page[last:])
    return "".join(out), len(finder.edits)
