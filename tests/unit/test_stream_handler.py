"""web.messages.run_stream_handler: what an HTTP/2 or HTTP/3 stream answers when its handler
fails or forgets to answer."""

from __future__ import annotations

import asyncio

import pytest

from blindfold.web.messages import BodyStream, Request, Responder, run_stream_handler


class _Recorder:
    def __init__(self) -> None:
        self.started = False
        self.ended = False
        self.aborted = False
        self.status = 0

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started, self.status = True, status

    async def send(self, data: bytes) -> None:
        pass

    async def end(self) -> None:
        self.ended = True

    def abort(self) -> None:
        self.aborted = True


def _request() -> Request:
    return Request(
        method=b"GET",
        target=b"/",
        authority=b"example.test",
        scheme=b"https",
        headers=[],
        http_version="2",
        client=("127.0.0.1", 40000),
        server=("127.0.0.1", 443),
        request_id="r1",
        tls={},
    )


def _run(handler: object) -> tuple[_Recorder, list[tuple[str, dict[str, object]]]]:
    events: list[tuple[str, dict[str, object]]] = []
    responder = _Recorder()
    body = BodyStream(1024, lambda n: None)
    body.end()

    async def go() -> None:
        await run_stream_handler(
            handler,  # type: ignore[arg-type]
            _request(),
            body,
            responder,
            lambda name, fields: events.append((name, fields)),
        )

    asyncio.run(go())
    return responder, events


def test_a_handler_that_does_not_answer_gets_a_500() -> None:
    async def silent(request: Request, body: BodyStream, respond: Responder) -> None:
        pass

    responder, events = _run(silent)
    assert (responder.status, responder.ended, events) == (500, True, [])


def test_a_handler_that_raises_before_answering_is_logged_and_answered_500() -> None:
    async def broken(request: Request, body: BodyStream, respond: Responder) -> None:
        raise ValueError("boom")

    responder, events = _run(broken)
    assert (responder.status, responder.ended, responder.aborted) == (500, True, False)
    assert events == [("handler_error", {"error": "ValueError('boom')", "request_id": "r1"})]


def test_a_handler_that_raises_mid_answer_resets_the_stream() -> None:
    async def half(request: Request, body: BodyStream, respond: Responder) -> None:
        await respond.start(200, [])
        raise ValueError("upstream went away")

    responder, events = _run(half)
    assert (responder.status, responder.aborted, responder.ended) == (200, True, False)
    assert events[0][0] == "handler_error"


def test_cancellation_goes_through() -> None:
    async def cancelled(request: Request, body: BodyStream, respond: Responder) -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        _run(cancelled)
