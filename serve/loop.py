"""The engine thread: one thread owns the Scheduler (which is not thread-safe).

HTTP handlers run on the asyncio loop and never touch the Scheduler. They call
`ServingLoop.submit(req)` (any thread) and get a `Stream` whose asyncio.Queue receives,
in order: ACCEPTED or a ValueError (the Scheduler's check rejected the request), then the
request's Events, or an Aborted error if the server stops before it finished. Submissions
and cancellations travel to the engine thread on a command queue, drained between steps;
an idle engine blocks on that queue instead of spinning.

    serving = ServingLoop(scheduler, max_queue=256, metrics=Metrics()); serving.start()
    stream = serving.submit(Request(prompt=[1, 2, 3], max_tokens=8))   # in a coroutine
    await stream.accepted()              # ValueError → 400
    event = await stream.next()          # Event(id, tokens, finished, reason)
    stream.cancel()                      # the client left: pages are freed at once
    serving.stop(timeout=10)             # finish what runs (up to timeout), abort the rest
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time

log = logging.getLogger("jaxlm.serve")

ACCEPTED = "accepted"


class Overloaded(RuntimeError):
    """Too many requests are already waiting (HTTP 429)."""


class ShuttingDown(RuntimeError):
    """The server is stopping and admits nothing new (HTTP 503)."""


class Aborted(RuntimeError):
    """The request was dropped before it finished: shutdown, or an engine failure."""


class Stream:
    """The asyncio side of one request: read its Events, or cancel it."""

    def __init__(self, serving: "ServingLoop", request_id: str):
        self.id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.done = False
        self._serving = serving

    async def _get(self):
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.done = True
            raise item
        return item

    async def accepted(self) -> None:
        """Returns once the Scheduler took the request; raises its ValueError if not."""
        await self._get()

    async def next(self):
        """The next Event; `done` is set once the finishing one came."""
        event = await self._get()
        if event.finished:
            self.done = True
        return event

    def cancel(self) -> None:
        """Drop the request (a no-op once it finished): its pages are freed at once."""
        if not self.done:
            self.done = True
            self._serving.cancel(self.id)


@dataclasses.dataclass
class _Live:
    """The engine thread's record of one request: where its Events go, and its times."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float
    first: float | None = None
    n_tokens: int = 0

    def deliver(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # its event loop is closed: nobody is listening any more
            pass


class ServingLoop:
    """Owns `scheduler` in one background thread. submit/cancel/stats/stop are
    thread-safe; everything else runs on the engine thread."""

    def __init__(self, scheduler, *, max_queue: int = 256, metrics=None):
        self.sched = scheduler
        self.max_queue = max_queue
        self.metrics = metrics
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0         # submissions not yet drained into the scheduler
        self._waiting = 0         # the scheduler's own queue, as of its last stats()
        self._stats: dict = {}
        self._live: dict[str, _Live] = {}
        self._stopping = False
        self._deadline = 0.0
        self._thread: threading.Thread | None = None

    # Any thread ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._publish_stats()
            self._thread = threading.Thread(target=self._run, name="jaxlm-engine",
                                            daemon=True)
            self._thread.start()

    def submit(self, req) -> Stream:
        """Queue `req`; call from a coroutine (its Events go to that event loop).
        Raises Overloaded when max_queue requests already wait, ShuttingDown once
        stop() was called."""
        stream = Stream(self, req.id)
        live = _Live(asyncio.get_running_loop(), stream.queue, time.perf_counter())
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._pending + self._waiting >= self.max_queue:
                self._count("overloaded")
                raise Overloaded(f"{self._pending + self._waiting} requests are waiting "
                                 f"(--max-queue {self.max_queue}); retry later")
            self._pending += 1
        self._commands.put(("submit", req, live))
        return stream

    def cancel(self, request_id: str) -> None:
        self._commands.put(("cancel", request_id))

    async def call(self, fn):
        """fn(scheduler) run on the engine thread between steps (the scheduler is not
        thread-safe): its result, or its exception raised here. Call from a coroutine."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._commands.put(("call", fn, loop, future))
        return await future

    def stats(self) -> dict:
        """The scheduler's stats() as of the engine thread's last look (a copy)."""
        with self._lock:
            return dict(self._stats)

    def stop(self, timeout: float = 10.0) -> bool:
        """Admit nothing new, let running requests finish for up to `timeout` seconds,
        abort the rest and join the thread. True if the thread ended."""
        with self._lock:
            self._stopping = True
            self._deadline = time.monotonic() + timeout
        self._commands.put(("wake",))
        if self._thread is None:
            return True
        self._thread.join(timeout + 30)  # a step in flight must end before the join
        return not self._thread.is_alive()

    # The engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._drain(block=not self.sched.has_work and not self._stopping)
            if self._stopping and (not self.sched.has_work
                                   or time.monotonic() > self._deadline):
                break
            if self.sched.has_work:
                self._step()
        self._abort_all()

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
            while True:
                self._handle(command)
                command = self._commands.get_nowait()
        except queue.Empty:
            pass
        self._publish_stats()

    def _handle(self, command) -> None:
        kind = command[0]
        if kind == "submit":
            self._admit(command[1], command[2])
        elif kind == "call":
            _, fn, loop, future = command
            try:
                result, error = fn(self.sched), None
            except Exception as e:   # the caller's to report (a ValueError: a 400)
                result, error = None, e

            def settle():
                if future.done():
                    return
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)
            loop.call_soon_threadsafe(settle)
        elif kind == "cancel":
            live = self._live.pop(command[1], None)
            if live is not None:  # not finished yet: free its pages now
                self.sched.cancel(command[1])
                self._count("cancelled")

    def _admit(self, req, live: _Live) -> None:
        with self._lock:
            self._pending -= 1
        try:
            self.sched.submit(req)
        except ValueError as e:
            live.deliver(e)
            self._count("invalid")
            return
        self._live[req.id] = live
        live.deliver(ACCEPTED)

    def _step(self) -> None:
        try:
            events = self.sched.step()
        except Exception as e:  # a bug, not a request's fault: fail what runs, go on
            log.exception("scheduler step failed")
            self._abort_all(Aborted(f"the engine failed: {type(e).__name__}: {e}"), "error",
                            queued=False)
            return
        now = time.perf_counter()
        for event in events:
            live = self._live.get(event.id)
            if live is not None:
                self._record(live, event, now)
                live.deliver(event)
                if event.finished:
                    del self._live[event.id]
        self._publish_stats()

    def _record(self, live: _Live, event, now: float) -> None:
        if self.metrics is None:
            return
        if event.tokens:
            if live.first is None:
                live.first = now
                self.metrics.ttft.observe(now - live.submitted)
            live.n_tokens += len(event.tokens)
            self.metrics.tokens.inc(len(event.tokens))
        if event.finished:
            if live.n_tokens > 1:
                self.metrics.tpot.observe((now - live.first) / (live.n_tokens - 1))
            self._count(event.reason or "stop")

    def _abort_all(self, error: Exception | None = None, outcome: str = "aborted",
                   queued: bool = True) -> None:
        """Cancel every live request and tell its client; with `queued`, also those
        still on the command queue (at shutdown)."""
        try:
            while queued:
                command = self._commands.get_nowait()
                if command[0] == "submit":
                    with self._lock:
                        self._pending -= 1
                    command[2].deliver(Aborted("the server is shutting down"))
                    self._count("aborted")
        except queue.Empty:
            pass
        for request_id, live in list(self._live.items()):
            try:
                self.sched.cancel(request_id)
            except Exception:  # a broken scheduler must not keep the others waiting
                log.exception("cancel of %s failed", request_id)
            live.deliver(error or Aborted("the server is shutting down before this "
                                          "request finished"))
            self._count(outcome)
        self._live.clear()
        self._publish_stats()

    def _publish_stats(self) -> None:
        stats = self.sched.stats()
        with self._lock:
            self._stats = stats
            self._waiting = stats.get("waiting", 0)
        if self.metrics is not None:
            self.metrics.scheduler_stats(stats)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.finished(outcome)
