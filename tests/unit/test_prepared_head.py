"""web.messages.PreparedHead / check_fields: a cached head is checked once, as h11 would."""

import h11
import pytest

from blindfold.web.messages import FieldError, PreparedHead, check_fields

GOOD = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"x-empty", b""),
    (b"etag", b'W/"a b"'),
    (b"x-latin", b"caf\xe9"),
]


def test_good_fields_pass_and_h11_agrees() -> None:
    check_fields(GOOD)
    h11.Response(status_code=200, headers=GOOD)  # the reference: h11 takes them too


@pytest.mark.parametrize(
    "field",
    [
        (b"Content-Type", b"x"),
        (b"a b", b"x"),
        (b"a:", b"x"),
        (b"", b"x"),
        (b"a", b" x"),
        (b"a", b"x\t"),
        (b"a", b"x\r\nb: y"),
        (b"a", b"x\nb"),
        (b"a", b"x\x00"),
        (b"a", b"x\x7f"),
    ],
)
def test_bad_fields_are_refused(field: tuple[bytes, bytes]) -> None:
    with pytest.raises(FieldError):
        check_fields([field])
    with pytest.raises(FieldError):
        PreparedHead(200, [field])


def test_bad_status_is_refused() -> None:
    with pytest.raises(FieldError):
        PreparedHead(42, [])
