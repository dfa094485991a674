"""A single-threaded event loop over ZeroMQ sockets and timers.

Each agent runs one reactor: it polls its sockets, calls the callback of each readable one,
and runs due timers. Handlers are plain functions; nothing here blocks longer than the
next timer or `max_wait` (so a stop request is seen within that time). A callback that
blocks blocks everything else, heartbeats included: `turns` counts the loop's turns, so that
another thread can tell a loop stuck in one step (mesh/runtime.py logs where it is stuck).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import os
import threading
import time
from typing import Callable

import zmq
from zmq.backend import zmq_poll

log = logging.getLogger(__name__)


class Timer:
    __slots__ = ("when", "fn", "interval", "cancelled")

    def __init__(self, when: float, fn: Callable[[], None], interval: float | None):
        self.when = when
        self.fn = fn
        self.interval = interval
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    def __init__(self, *, max_wait: float = 0.1):
        self.poller = zmq.Poller()
        self._callbacks: dict[object, Callable[[], None]] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._stopping = False
        self.max_wait = max_wait
        self._soon: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._wake_lock = threading.Lock()
        self.turns = 0   # run_once calls so far: unchanged for longer than max_wait means a callback is blocking

    def add_socket(self, sock: zmq.Socket | int, callback: Callable[[], None]) -> None:
        self.poller.register(sock, zmq.POLLIN)
        self._callbacks[sock] = callback

    def remove_socket(self, sock: zmq.Socket | int) -> None:
        if sock in self._callbacks:
            self.poller.unregister(sock)
            del self._callbacks[sock]

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, fn, None)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def every(self, interval: float, fn: Callable[[], None], *, first: float | None = None) -> Timer:
        timer = Timer(time.monotonic() + (interval if first is None else first), fn, interval)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Runs `fn` on the reactor's thread at its next turn; callable from any thread.

        Worker threads and process pools hand their results back this way, so that stores and
        sockets are only ever touched by the reactor's own thread."""
        if self._wake_w is None:
            with self._wake_lock:
                if self._wake_w is None:
                    r, w = os.pipe()
                    os.set_blocking(r, False)
                    os.set_blocking(w, False)
                    self._wake_r = r
                    self.add_socket(r, self._drain_soon)
                    self._wake_w = w
        self._soon.append(fn)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the reactor is already due to wake

    def _drain_soon(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._soon:
            self._guarded(self._soon.popleft())

    def close(self) -> None:
        """Releases the wake-up pipe (sockets belong to their owners)."""
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                try:
                    self.remove_socket(fd)
                except KeyError:
                    pass
                os.close(fd)
        self._wake_r = self._wake_w = None

    def stop(self) -> None:
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    def run(self) -> None:
        self._stopping = False
        while not self._stopping:
            self.run_once()

    def run_once(self, max_wait: float | None = None) -> None:
        self.turns += 1
        wait = self.max_wait if max_wait is None else max_wait
        if self._timers:
            wait = max(0.0, min(wait, self._timers[0][0] - time.monotonic()))
        try:
            # zmq_poll itself, not Poller.poll's Python wrapper: this runs once per message an agent handles
            events = zmq_poll(self.poller.sockets, math.ceil(wait * 1000))  # int() would round down and spin
        except zmq.ZMQError as exc:
            if exc.errno == zmq.ETERM:
                self._stopping = True
                return
            raise
        callbacks = self._callbacks
        for sock, _ in events:
            callback = callbacks.get(sock)
            if callback is not None:
                try:
                    callback()
                except Exception:   # as _guarded, inline
                    log.exception("callback %r failed", getattr(callback, "__qualname__", callback))
        if self._timers and self._timers[0][0] <= time.monotonic():
            self._run_timers()

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            if timer.interval is not None:
                timer.when = max(timer.when + timer.interval, now)
                heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
            self._guarded(timer.fn)

    @staticmethod
    def _guarded(fn: Callable[[], None]) -> None:
        # One faulty callback must not take the agent down; it is logged with its traceback.
        try:
            fn()
        except Exception:
            log.exception("callback %r failed", getattr(fn, "__qualname__", fn))
