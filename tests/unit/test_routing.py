from __future__ import annotations

from blindfold.core.routing import SniRouter


def test_most_specific_wins() -> None:
    r = SniRouter(
        [
            ("example.test", "exact"),
            ("*.example.test", "wild"),
            ("*.api.example.test", "api"),
            ("www.api.example.test", "www-api"),
        ]
    )
    assert r.lookup("example.test") == "exact"
    assert r.lookup("a.example.test") == "wild"
    assert r.lookup("a.b.example.test") == "wild"
    assert r.lookup("x.api.example.test") == "api"
    assert r.lookup("deep.x.api.example.test") == "api"
    assert r.lookup("www.api.example.test") == "www-api"
    assert r.lookup("api.example.test") == "wild"
    assert r.lookup("example.org") is None
    assert r.lookup(None) is None
    assert r.lookup("notexample.test") is None


def test_default_route() -> None:
    r = SniRouter([("a.test", 1)], default=0)
    assert r.lookup("b.test") == 0
    assert r.lookup(None) == 0
    assert r.lookup("a.test") == 1
