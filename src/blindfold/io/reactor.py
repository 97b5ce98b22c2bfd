"""A minimal epoll reactor for the edge worker's hot path.

Why not asyncio here: the edge must spend no more CPU per relayed connection than HAProxy. On
this project's benchmark (bench/l4 harness, `conn` test) an asyncio splice relay with raw
add_reader/add_writer callbacks cost ~230 µs of CPU per connection against HAProxy's ~165;
the same relay on a bare `select.epoll` loop cost ~167 µs. asyncio's per-callback Handle
objects, selector bookkeeping and ready-queue round trips are the difference. The worker needs
only fd callbacks, timers and signal wake-ups, which this module gives in ~150 lines; every
other process (the edge master, the origin agent) uses asyncio.

Handlers receive the epoll event mask. Timers are a heap of (when, seq, callback); a cancelled
timer stays in the heap and is skipped when it comes due. `now` is refreshed once per poll.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import select
import signal
import time
from collections.abc import Callable

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
EPOLLRDHUP = select.EPOLLRDHUP

EPOLLET = select.EPOLLET
Handler = Callable[[int], None]


def _noop() -> None:
    pass


class Timer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.callback = _noop  # drop the reference to the owner now, not when it comes due


class Reactor:
    def __init__(self) -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = 0
        self._idle: list[Callable[[], None]] = []
        self._running = False
        self._signal_r = -1
        self._signal_w = -1
        self._signal_handlers: dict[int, Callable[[], None]] = {}
        self.now = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._armed: asyncio.TimerHandle | None = None
        self._armed_when = float("inf")

    # ------------------------------------------------------------------ fds
    def add(self, fd: int, mask: int, handler: Handler) -> None:
        self._ep.register(fd, mask)
        self._handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        self._ep.modify(fd, mask)

    def is_registered(self, fd: int) -> bool:
        return fd in self._handlers

    def set_handler(self, fd: int, handler: Handler) -> None:
        self._handlers[fd] = handler

    def forget(self, fd: int) -> None:
        """Drop `fd`'s handler before closing it: closing a descriptor removes it from epoll
        by itself (ours are never dup'd), so this saves the epoll_ctl call. Events already
        fetched for it in this batch are dropped too."""
        self._handlers.pop(fd, None)

    def remove(self, fd: int) -> None:
        """Forget `fd`. Call before closing it (epoll drops closed fds itself, but a dup'd
        descriptor would keep the registration alive)."""
        if self._handlers.pop(fd, None) is not None:
            try:
                self._ep.unregister(fd)
            except OSError:
                pass

    # ------------------------------------------------------------------ time
    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(when, callback)
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, timer))
        if self._loop is not None and when < self._armed_when:
            self._arm()
        return timer

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(self.now + delay, callback)

    def on_idle(self, callback: Callable[[], None]) -> None:
        """Run `callback` after every batch of events (used to flush buffered logs)."""
        self._idle.append(callback)

    # ------------------------------------------------------------------ signals
    def add_signal(self, signum: int, callback: Callable[[], None]) -> None:
        """Run `callback` from the loop (not from the signal handler) when `signum` arrives."""
        if self._loop is not None:
            self._loop.add_signal_handler(signum, callback)
            return
        if self._signal_r < 0:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._signal_r, self._signal_w = r, w
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self.add(r, EPOLLIN, self._on_signal_pipe)
        self._signal_handlers[signum] = callback
        signal.signal(signum, lambda *_: None)  # delivery goes through the wakeup fd

    def _on_signal_pipe(self, _events: int) -> None:
        try:
            data = os.read(self._signal_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            callback = self._signal_handlers.get(signum)
            if callback is not None:
                callback()

    # ------------------------------------------------------------------ loop
    def stop(self) -> None:
        self._running = False
        if self._loop is not None:
            self._loop.stop()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run inside `loop` instead of `run()`: the epoll fd becomes one of the loop's readers
        and reactor timers are mirrored by one loop timer. Used by workers that also serve
        asyncio code (TLS and HTTP at the edge); the fd handlers are called exactly as in
        `run()`. May be called from inside `run()`: it then returns after this round of
        events, and the loop must be run (`stop()` stops it). Signal handlers registered so
        far move to the loop."""
        self._loop = loop
        self._running = False
        loop.add_reader(self._ep.fileno(), self._on_epoll)
        if self._signal_r >= 0:
            for signum, callback in self._signal_handlers.items():
                loop.add_signal_handler(signum, callback)  # (it takes over the wakeup fd)
            self.remove(self._signal_r)
            os.close(self._signal_r)
            os.close(self._signal_w)
            self._signal_r = self._signal_w = -1
        self._arm()

    def _on_epoll(self) -> None:
        events = self._ep.poll(0, 1024)
        self.now = time.monotonic()
        handlers = self._handlers
        for fd, mask in events:
            handler = handlers.get(fd)
            if handler is not None:
                handler(mask)
        self._run_due()

    def _run_due(self) -> None:
        timers = self._timers
        now = self.now = time.monotonic()
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.callback()
        for callback in self._idle:
            callback()
        self._arm()

    def _on_timer(self) -> None:
        self._armed = None
        self._armed_when = float("inf")
        self._run_due()

    def _arm(self) -> None:
        loop = self._loop
        assert loop is not None
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        when = timers[0][0] if timers else float("inf")
        if when == self._armed_when:
            return
        if self._armed is not None:
            self._armed.cancel()
            self._armed = None
        self._armed_when = when
        if when != float("inf"):
            # the reactor and asyncio share the monotonic clock (loop.time() is monotonic)
            self._armed = loop.call_at(when, self._on_timer)

    def run(self) -> None:
        self._running = True
        poll = self._ep.poll
        handlers = self._handlers
        timers = self._timers
        idle = self._idle
        monotonic = time.monotonic
        while self._running:
            timeout = 1.0
            if timers:
                timeout = timers[0][0] - self.now
                if timeout > 1.0:
                    timeout = 1.0
                elif timeout < 0.0:
                    timeout = 0.0
            events = poll(timeout, 1024)
            self.now = now = monotonic()
            for fd, mask in events:
                handler = handlers.get(fd)
                if handler is not None:
                    handler(mask)
            while timers and timers[0][0] <= now:
                _, _, timer = heapq.heappop(timers)
                if not timer.cancelled:
                    timer.callback()
            for callback in idle:
                callback()

    def close(self) -> None:
        if self._signal_r >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self._signal_r)
            os.close(self._signal_w)
            self._signal_r = self._signal_w = -1
        self._ep.close()
