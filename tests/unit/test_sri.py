"""Page rewriting for Subresource Integrity: only the tags of published files change."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from blindfold.core.sri import Published, rewrite

FILES = {
    "/js/app.js": Published("https://cdn.test/p/1.js", "sha384-AAA"),
    "/css/site.css": Published("https://cdn.test/p/2.css", "sha384-BBB"),
}


def test_scripts_and_stylesheets_are_pointed_at_the_edge() -> None:
    page = (
        '<head><link rel="preload stylesheet" href="../css/site.css">'
        '<script async src="app.js" integrity="sha256-old"></script>'
        '<link rel="icon" href="/css/site.css"><script src="/other.js"></script>'
        '<script src="https://elsewhere/js/app.js"></script></head>'
    )
    out, count = rewrite(page, "/js/index.html", FILES)
    assert count == 2
    assert (
        '<link rel="preload stylesheet" href="https://cdn.test/p/2.css" '
        'integrity="sha384-BBB" crossorigin="anonymous">'
    ) in out
    assert (
        '<script async src="https://cdn.test/p/1.js" integrity="sha384-AAA" '
        'crossorigin="anonymous"></script>'
    ) in out
    assert "sha256-old" not in out
    # not a stylesheet, not published, not ours: untouched
    assert '<link rel="icon" href="/css/site.css">' in out
    assert '<script src="/other.js"></script>' in out
    assert '<script src="https://elsewhere/js/app.js"></script>' in out


def test_text_inside_scripts_and_comments_is_not_a_tag() -> None:
    page = (
        '<script>var s = "<script src=/js/app.js>";</script>\n'
        '<!-- <script src="/js/app.js"></script> -->\n<p>&amp; <b>x</b></p>'
    )
    assert rewrite(page, "/", FILES) == (page, 0)


def test_attribute_values_are_escaped() -> None:
    files = {"/a.js": Published('https://cdn.test/p/"x".js', "sha384-<>")}
    out, _ = rewrite("<script src=/a.js></script>", "/", files)
    assert 'src="https://cdn.test/p/&quot;x&quot;.js" integrity="sha384-&lt;&gt;"' in out


@given(st.text(max_size=300))
def test_any_page_without_published_tags_is_unchanged(page: str) -> None:
    assert rewrite(page, "/", {}) == (page, 0)


@given(st.text(alphabet="<>/=\"' abcdeiprst.\n", max_size=200))
def test_only_tags_change(noise: str) -> None:
    page = noise + '<script src="/js/app.js"></script>' + noise
    out, count = rewrite(page, "/", FILES)
    if count == 0:  # the noise swallowed the tag (e.g. an open comment or attribute)
        assert out == page
        return
    assert (
        out.replace(
            '<script src="https://cdn.test/p/1.js" integrity="sha384-AAA" '
            'crossorigin="anonymous"></script>',
            '<script src="/js/app.js"></script>',
        )
        == page
    )
