"""The engine thread: ONE thread owns the Engine and drives `engine.step()`; the HTTP side talks to it by message.

    loop = EngineLoop(engine, metrics)
    loop.start()
    q = loop.submit(rid, prompt_ids, params)        # from the asyncio event loop; None when the queue is full
    out = await q.get()                             # RequestOutput items (or an exception), until each choice ends
    loop.abort(rid)                                 # a client went away: its rows leave the batch at the next turn
    result = await loop.call(fn)                    # run fn() on the engine thread, between two steps

The Engine is not thread-safe, so nothing but this thread touches it: requests, aborts and model work (the
attention endpoint's forward pass) arrive as commands on a queue that the thread drains before every step.
Requests join and leave the running batch between steps (the engine's continuous batching); each step's outputs
go back to their request's asyncio.Queue through `call_soon_threadsafe`. While nothing is running the thread
sleeps on the command queue.

`max_queue` bounds the requests WAITING for a row (submitted, not yet given their first token); the running rows
are bounded by the engine's max_batch. Continuations (the tool-call phase of a chat reply) are not counted: they
finish work already admitted.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("lmforge.serve")


@dataclass
class Route:
    """Where one request's outputs go, and its timings (for the latency metrics)."""
    loop: object                           # the asyncio event loop of the request's handler
    q: object                              # its asyncio.Queue
    remaining: int                         # choices not finished yet
    counted: bool                          # whether it counts against max_queue while waiting
    t_submit: float = field(default_factory=time.perf_counter)
    started: bool = False                  # got its first token (it is no longer waiting)
    last: dict = field(default_factory=dict)   # choice -> time of its last token


class EngineLoop:
    def __init__(self, engine, metrics=None, max_queue: int = 256):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._routes: dict[object, Route] = {}
        self._lock = threading.Lock()      # guards `waiting` (changed by both threads)
        self.waiting = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self.steps = 0
        self.stats: dict = {}
        self._publish()

    # ---- the HTTP side (event loop thread) ----
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._cmds.put(("wake",))
        self._thread.join(timeout)

    def submit(self, request_id, prompt_ids: list[int], params, constraint=None, *, counted: bool = True):
        """Queue a request; returns its asyncio.Queue, or None when max_queue requests are already waiting."""
        import asyncio
        with self._lock:
            if counted and self.waiting >= self.max_queue:
                return None
            if counted:
                self.waiting += 1
        q: asyncio.Queue = asyncio.Queue()
        route = Route(asyncio.get_running_loop(), q, params.n, counted)
        self._cmds.put(("add", request_id, prompt_ids, params, constraint, route))
        return q

    def abort(self, request_id) -> None:
        self._cmds.put(("abort", request_id))

    async def call(self, fn):
        """fn() on the engine thread between two steps (the model is free then); its result or its exception."""
        import asyncio
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._cmds.put(("call", fn, loop, fut))
        return await fut

    # ---- the engine thread ----
    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            self._drain(block=not engine.has_unfinished())
            if engine.has_unfinished():
                try:
                    outs = engine.step()
                except Exception as e:  # a bug: fail every request rather than leave them hanging
                    log.exception("engine step failed")
                    self._fail_all(e)
                    continue
                self.steps += 1
                self._dispatch(outs)
            self._publish()

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._cmds.get(timeout=0.5) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, ids, params, constraint, route = cmd
            try:
                self.engine.add_request(rid, ids, params, constraint=constraint, add_bos=False)
            except Exception as e:  # LmforgeError: a request the engine refuses (the handler answers 4xx)
                self._unwait(route)
                self._post(route, e)
                return
            self._routes[rid] = route
        elif kind == "abort":
            self.engine.abort(cmd[1])   # its 'abort' outputs come from the next step and close the route
        elif kind == "call":
            _, fn, loop, fut = cmd
            try:
                res, err = fn(), None
            except Exception as e:
                res, err = None, e
            try:
                loop.call_soon_threadsafe(_settle, fut, res, err)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

    def _dispatch(self, outs) -> None:
        now = time.perf_counter()
        m = self.metrics
        for o in outs:
            route = self._routes.get(o.request_id)
            if route is None:
                continue
            if o.token_ids:
                if not route.started:
                    route.started = True
                    self._unwait(route)
                    if m is not None:
                        m.ttft.observe(now - route.t_submit)
                if m is not None:
                    m.generation_tokens.inc(len(o.token_ids))
                    if o.index in route.last:
                        m.inter_token.observe(now - route.last[o.index])
                route.last[o.index] = now
            self._post(route, o)
            if o.finished:
                route.remaining -= 1
                if m is not None:
                    m.finished.labels(o.finish_reason or "unknown").inc()
                if route.remaining <= 0:
                    self._unwait(route)
                    del self._routes[o.request_id]

    def _unwait(self, route: Route) -> None:
        if route.counted:
            with self._lock:
                self.waiting -= 1
            route.counted = False

    @staticmethod
    def _post(route: Route, item) -> None:
        try:
            route.loop.call_soon_threadsafe(route.q.put_nowait, item)
        except RuntimeError:  # the handler's event loop is closed (shutdown): nobody is listening
            pass

    def _fail_all(self, err: Exception) -> None:
        for rid, route in list(self._routes.items()):
            self.engine.abort(rid)
            self._unwait(route)
            self._post(route, err)
        self._routes.clear()
        try:
            self.engine.step()  # collect the abort outputs (nobody is routed any more)
        except Exception:
            log.exception("engine step failed again after aborting every request")

    def _publish(self) -> None:
        e = self.engine
        live, used = e.num_live(), e.used_slots()
        self.stats = {"live_rows": live, "waiting_requests": e.num_waiting(), "used_slots": used,
                      "free_slots": e.max_batch - used, "requests": len(self._routes), "steps": self.steps,
                      "queued": self.waiting}
        pc = e.prefix_cache.stats() if e.prefix_cache is not None else None
        if pc is not None:
            self.stats["prefix_cache"] = pc
        if self.metrics is not None:
            self.metrics.running.set(live)
            self.metrics.queued.set(self.waiting)
            if pc is not None:
                self.metrics.prefix_hit_rate.set(pc["hit_rate"])
                self.metrics.prefix_hit_tokens.set(pc["hit_tokens"])
                self.metrics.prefix_blocks.set(pc["blocks"])


def _settle(fut, res, err) -> None:
    if fut.cancelled():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(res)
