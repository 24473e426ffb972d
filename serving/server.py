"""The gRPC server: the pensieve.v1.Pensieve service over an Engine, on grpc.aio.

    server = PensieveServer(engine, port=50051, metrics=Metrics(engine))
    await server.start()
    ...
    await server.shutdown(grace=5.0)   # finish in-flight turns for up to 5 s, then cancel them

`BackgroundServer(engine)` runs one on its own thread (notebooks, tests).

Each Chat conversation is a Session kept here: it holds the exact token history, so the next turn
finds the whole conversation in the engine's cache. The engine loop runs in its own thread; each
streaming call reads its turn in a worker thread that hands chunks to the event loop, so any
number of streams proceed at once. A call that is cancelled, disconnects or passes its deadline
cancels its turn in the engine at once; the conversation keeps what was generated. Idle
conversations expire with the engine's conversation_ttl_s.

Warm-up: `PensieveServer(engine, warm_up=True)` (what `pensieve serve` and `pensieve cluster`
do) opens its port at once with gRPC health NOT_SERVING, compiles the engine's programs
(`engine.warm_up()`) on a background thread, then reports SERVING. Meanwhile health checks,
reflection and GetStats answer; Chat and Generate calls wait behind the warm-up (their deadline
still runs) and then proceed; if the warm-up fails they end UNAVAILABLE. `warm_up_later(options)`
gives the engine options for such a server (the engine's own precompile off).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pensieve_jax.engine.engine import Engine, EngineConfig
from pensieve_jax.session import Session, TurnStream, check_messages
from serving.errors import ConversationNotFound, NotReady, ShuttingDown, TurnInProgress, \
    status_for
from serving.mempool import GRPC_OPTIONS, MEMPOOL_SERVICE, MemPoolService
from serving.metrics import Metrics
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.protocol import messages_from_proto, sampling_from_proto, usage_to_proto

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Pensieve"].full_name   # "pensieve.v1.Pensieve"
DEFAULT_HOST = "127.0.0.1"
ROLES = ("prefill", "decode", "both")      # what a router may use a replica for
PRECOMPILE_ENV = "PENSIEVE_JAX_PRECOMPILE"   # 0: engines compile their programs on first use


def warm_up_later(options: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """EngineConfig options for an engine a PensieveServer warms up once its port is open:
    (the options with the engine's own precompile off, whether the server should warm it up:
    EngineConfig.precompile, None meaning on unless PENSIEVE_JAX_PRECOMPILE=0). An engine
    without precompile gets the options unchanged and no warm-up."""
    if "precompile" not in {f.name for f in dataclasses.fields(EngineConfig)}:
        return dict(options), False
    wanted = options.get("precompile")
    if wanted is None:
        config = EngineConfig(**options)
        wanted = config.precompile_enabled if hasattr(config, "precompile_enabled") else \
            os.environ.get(PRECOMPILE_ENV, "1").strip().lower() not in ("0", "false", "no")
    return {**options, "precompile": False}, bool(wanted)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class _Worker:
    """Runs a blocking iterator in a worker thread; the event loop reads its items in order.
    cancel() stops it: on_cancel unblocks the iterator (it cancels the engine turn), and the
    worker closes the iterator at its next item."""

    def __init__(self, loop: asyncio.AbstractEventLoop, executor, make_iter: Callable[[], Iterator],
                 on_cancel: Callable[[], None]):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._on_cancel = on_cancel
        self.cancelled = False
        self.ended = False          # the reader saw the iterator's end (or its error)
        self.done = loop.run_in_executor(executor, self._run, loop, make_iter)

    def _run(self, loop, make_iter) -> None:
        def put(item):
            loop.call_soon_threadsafe(self._queue.put_nowait, item)
        try:
            items = make_iter()
            try:
                for item in items:
                    if self.cancelled:
                        break
                    put(item)
            finally:
                if hasattr(items, "close"):
                    items.close()
        except BaseException as e:  # handed to the reader
            put(_Failed(e))
            return
        put(_END)

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._on_cancel()

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._queue.get()
        if item is _END:
            self.ended = True
            raise StopAsyncIteration
        if isinstance(item, _Failed):
            self.ended = True
            raise item.error
        return item


@dataclasses.dataclass(eq=False)
class _Conversation:
    session: Session
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    turn: _Worker | None = None
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


def _seed_history(session: Session, messages: list[dict[str, str]], ids: list[int],
                  continuing: bool) -> list[dict[str, str]]:
    """ChatRequest.history_token_ids: the session continues from exactly `ids` (a router moved
    the conversation here). When continuing, all messages but the last join the history first.
    Returns the turn's messages."""
    vocab = session.engine.model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"history_token_ids out of range [0, {vocab}): {bad[:5]}")
    if continuing:
        earlier = check_messages(messages[:-1])
        session.history += earlier
        session._template_history += earlier
        messages = messages[-1:]
    session._ids = list(ids)
    return messages


class PensieveService(pb_grpc.PensieveServicer):
    """The RPCs. Runs on one event loop; blocking engine calls go to worker threads."""

    def __init__(self, engine: Engine, metrics: Metrics | None = None, model_name: str | None = None,
                 max_streams: int = 1024):
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name or engine.model.config.name
        self.ttl = engine.config.conversation_ttl_s
        self.conversations: dict[str, _Conversation] = {}
        self.workers: set[_Worker] = set()
        self.active_streams = 0
        self.draining = False
        self.role = "both"              # prefill | decode | both: a hint for routers
        self.mempool = None             # its MemPoolService, once served
        self.warming: asyncio.Future | None = None   # set while/after the engine warms up
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_streams, thread_name_prefix="pensieve-stream")

    # -- RPCs -----------------------------------------------------------------------------------

    async def Chat(self, request: pb.ChatRequest, context) -> AsyncIterator[pb.ChatResponse]:
        async for response in self._stream("Chat", context, self._chat(request)):
            yield response

    async def Generate(self, request: pb.GenerateRequest, context):
        async for response in self._stream("Generate", context, self._generate(request)):
            yield response

    async def EndConversation(self, request: pb.EndConversationRequest, context):
        return await self._unary("EndConversation", context, self._end(request))

    async def GetStats(self, request: pb.GetStatsRequest, context):
        return await self._unary("GetStats", context, self._stats())

    # -- status codes, metrics ------------------------------------------------------------------

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(method, code.name).inc()

    @staticmethod
    def _cancel_code(context) -> grpc.StatusCode:
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
            else grpc.StatusCode.CANCELLED

    async def _stream(self, method: str, context, responses: AsyncIterator) -> AsyncIterator:
        self.active_streams += 1
        if self.metrics is not None:
            self.metrics.active.inc()
        error = None
        try:
            async for response in responses:
                yield response
        except asyncio.CancelledError:
            self._count(method, self._cancel_code(context))
            raise
        except Exception as e:  # reported as a status below
            error = e
        finally:
            await responses.aclose()
            self.active_streams -= 1
            if self.metrics is not None:
                self.metrics.active.dec()
        await self._finish(method, context, error)

    async def _unary(self, method: str, context, call):
        try:
            response = await call
        except asyncio.CancelledError:
            self._count(method, self._cancel_code(context))
            raise
        except Exception as e:
            await self._finish(method, context, e)
        else:
            self._count(method, grpc.StatusCode.OK)
            return response

    async def _finish(self, method: str, context, error: Exception | None) -> None:
        if error is None:
            self._count(method, grpc.StatusCode.OK)
            return
        code, message = status_for(error)
        if code == grpc.StatusCode.INTERNAL:
            log.error("%s failed", method, exc_info=error)
        self._count(method, code)
        await context.abort(code, message)

    def adopt(self, conversation_id: str, cache_salt: str | None = None) -> None:
        """Open a Chat conversation on an engine conversation that already exists (its KV was
        imported through MemPool): a router continues it with ChatRequest.conversation_id plus
        the messages and history_token_ids of what it holds."""
        session = Session(self.engine, cache_salt=cache_salt)
        session.conversation_id = conversation_id
        self.conversations[conversation_id] = _Conversation(session)

    async def _until_warm(self) -> None:
        """A turn that arrives while the engine warms up waits for it (NotReady if it failed)."""
        if self.warming is not None:
            await asyncio.shield(self.warming)

    def _observe(self, usage) -> None:
        if self.metrics is not None:
            self.metrics.observe_turn(usage)

    # -- turns ----------------------------------------------------------------------------------

    def _start(self, make_iter: Callable[[], Iterator], on_cancel: Callable[[], None]) -> _Worker:
        if self.draining:
            raise ShuttingDown("the server is shutting down")
        worker = _Worker(asyncio.get_running_loop(), self._executor, make_iter, on_cancel)
        self.workers.add(worker)
        worker.done.add_done_callback(lambda _: self.workers.discard(worker))
        return worker

    async def _acquire(self, conversation_id: str) -> _Conversation:
        """The conversation, free for a new turn (waiting out a cancelled turn's end)."""
        while True:
            conv = self.conversations.get(conversation_id)
            if conv is not None and conv.turn is None and self._expired(conv):
                await self._forget(conversation_id)
                conv = None
            if conv is None:
                raise ConversationNotFound(f"no conversation {conversation_id!r}: it was never "
                                           "started, was ended, or expired")
            if conv.turn is None:
                return conv
            if not conv.turn.cancelled:
                raise TurnInProgress(f"conversation {conversation_id!r} has a turn in progress; "
                                     "send the next turn after it finished")
            await conv.idle.wait()

    def _expired(self, conv: _Conversation) -> bool:
        return self.ttl is not None and time.monotonic() - conv.last_used > self.ttl

    async def _forget(self, conversation_id: str) -> None:
        conv = self.conversations.pop(conversation_id, None)
        if conv is not None:
            await asyncio.to_thread(conv.session.close)

    def _turn_ended(self, conv: _Conversation, worker: _Worker) -> None:
        if conv.turn is worker:
            conv.turn = None
            conv.last_used = time.monotonic()
            conv.idle.set()

    def _worker_done(self, conv: _Conversation, worker: _Worker) -> None:
        self._turn_ended(conv, worker)
        session = conv.session
        if self.conversations.get(session.conversation_id) is not conv:
            # a first turn that never got accepted (bad input, or cancelled before the engine
            # took it), or a conversation ended meanwhile: free its cache
            asyncio.get_running_loop().run_in_executor(None, session.close)

    async def _chat(self, request: pb.ChatRequest) -> AsyncIterator[pb.ChatResponse]:
        params = sampling_from_proto(request.sampling)
        messages = messages_from_proto(request.messages)
        if not messages:
            raise ValueError("no messages: send the new turn's messages (with a conversation_id) "
                             "or the whole history (without one)")
        await self._until_warm()
        if request.conversation_id:
            conv = await self._acquire(request.conversation_id)
            if request.cache_salt and request.cache_salt != (conv.session.cache_salt or ""):
                raise ValueError(
                    f"cache_salt does not match conversation {request.conversation_id!r}: a "
                    "conversation keeps the cache_salt it began with; send that salt, or none, "
                    "with its turns")
            turn_messages = messages
        else:        # a new conversation: its history, then the turn (the last message)
            conv = _Conversation(Session(self.engine, history=messages[:-1],
                                         cache_salt=request.cache_salt or None))
            turn_messages = messages[-1:]
        if request.history_token_ids:
            turn_messages = _seed_history(conv.session, turn_messages,
                                          list(request.history_token_ids),
                                          continuing=bool(request.conversation_id))
        session, cid = conv.session, conv.session.conversation_id
        worker = self._start(lambda: session.stream_chunks(turn_messages, params), session.cancel)
        conv.turn = worker
        conv.idle.clear()
        worker.done.add_done_callback(lambda _: self._worker_done(conv, worker))
        accepted = False
        try:
            async for chunk in worker:
                if not accepted:          # the engine took the turn: the conversation exists
                    accepted = True
                    self.conversations.setdefault(cid, conv)
                    yield pb.ChatResponse(conversation_id=cid)
                elif chunk.text or chunk.token_ids:
                    yield pb.ChatResponse(conversation_id=cid, text=chunk.text,
                                          token_ids=chunk.token_ids)
        finally:
            if worker.ended:   # the session is free: say so before the last message goes out
                self._turn_ended(conv, worker)
            else:              # cancelled, disconnected or past its deadline
                worker.cancel()
        reply = session.last_reply
        self._observe(reply.usage)
        yield pb.ChatResponse(conversation_id=cid, finish_reason=reply.finish_reason,
                              usage=usage_to_proto(reply.usage))

    async def _generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        params = sampling_from_proto(request.sampling)
        which = request.WhichOneof("prompt")
        if which is None:
            raise ValueError("no prompt: set text or token_ids")
        await self._until_warm()
        handles = []

        def run():
            if which == "text":
                ids = self.engine.tokenizer.encode(request.text, add_special_tokens=True)
            else:
                ids = list(request.token_ids.ids)
            handle = self.engine.submit(ids, params, cache_salt=request.cache_salt or None)
            handles.append(handle)
            turn = TurnStream(self.engine, handle, params)
            try:
                yield None                # accepted
                yield from turn
            except GeneratorExit:
                turn.stop()
                raise
            yield (turn.last_chunk(), turn.reply(), turn.output.conversation_id)

        worker = self._start(run, lambda: handles and handles[0].cancel())
        final = None
        try:
            async for item in worker:
                if isinstance(item, tuple):
                    final = item
                elif item is not None and (item.text or item.token_ids):
                    yield pb.GenerateResponse(text=item.text, token_ids=item.token_ids)
        finally:
            if not worker.ended:
                worker.cancel()
        last, reply, cid = final
        self._observe(reply.usage)
        yield pb.GenerateResponse(conversation_id=cid, text=last.text, token_ids=last.token_ids,
                                  finish_reason=reply.finish_reason,
                                  usage=usage_to_proto(reply.usage))

    async def _end(self, request: pb.EndConversationRequest) -> pb.EndConversationResponse:
        cid = request.conversation_id
        if not cid:
            raise ValueError("conversation_id is empty")
        if cid in self.conversations:
            await self._forget(cid)
        elif not await asyncio.to_thread(self.engine.end_conversation, cid):
            raise ConversationNotFound(f"no conversation {cid!r}")
        return pb.EndConversationResponse()

    async def _stats(self) -> pb.GetStatsResponse:
        stats = await asyncio.to_thread(self.engine.stats)
        stats["role"] = self.role
        if self.mempool is not None:
            stats["mempool"] = dict(self.mempool.stats)
        device = stats["pages"]["device"]
        return pb.GetStatsResponse(
            stats_json=json.dumps(stats, sort_keys=True), model=self.model_name,
            running=stats["running"], waiting=stats["waiting"],
            conversations=stats["conversations"], pages_used=device["used"],
            pages_total=device["total"], hit_tokens=stats["hit_tokens"],
            miss_tokens=stats["miss_tokens"], active_streams=self.active_streams,
            server_conversations=len(self.conversations))

    # -- lifecycle ------------------------------------------------------------------------------

    async def expire_loop(self) -> None:
        """Forget conversations idle for longer than the engine's conversation_ttl_s."""
        period = min(max(self.ttl / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            for cid, conv in list(self.conversations.items()):
                if conv.turn is None and self._expired(conv):
                    try:
                        await self._forget(cid)
                    except Exception:  # keep expiring the others
                        log.exception("ending expired conversation %s failed", cid)

    async def drain(self, grace: float) -> None:
        """Let running turns finish for up to `grace` seconds, then cancel the rest (their
        streams end with finish_reason "abort")."""
        self.draining = True
        if self.workers:
            await asyncio.wait([w.done for w in self.workers], timeout=grace)
        for worker in list(self.workers):
            worker.cancel()
        if self.workers:
            await asyncio.wait([w.done for w in self.workers], timeout=30)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class PensieveServer:
    """The service plus gRPC health (grpc.health.v1) and server reflection, on one port.

    warm_up: after start() opens the port (health NOT_SERVING), run engine.warm_up() on a
    background thread, then report SERVING (`wait_ready()`); turns wait for it. Without it (or
    for an engine without warm_up) health is SERVING from start()."""

    def __init__(self, engine: Engine, host: str = DEFAULT_HOST, port: int = 0,
                 metrics: Metrics | None = None, model_name: str | None = None,
                 max_streams: int = 1024, options: list[tuple[str, Any]] | None = None,
                 role: str = "both", warm_up: bool = False):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.engine = engine
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.metrics = metrics
        self.service = PensieveService(engine, metrics, model_name, max_streams)
        self.service.role = role
        self.mempool = MemPoolService(self.service)      # pensieve.v1.MemPool (KV transfer)
        self.service.mempool = self.mempool
        self.health = health.aio.HealthServicer()
        self._options = GRPC_OPTIONS if options is None else options
        self._server: grpc.aio.Server | None = None
        self._expiry: asyncio.Task | None = None
        self.warm_up = warm_up and callable(getattr(engine, "warm_up", None))
        self.warm_s: float | None = None      # how long the warm-up took
        self.programs: dict | None = None     # engine.stats()["programs"] after it, if any
        self._warming: asyncio.Task | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ready(self) -> bool:
        """Started, and warm (health SERVING)."""
        gate = self.service.warming
        return self._server is not None and (gate is None or gate.done() and
                                             gate.exception() is None)

    async def wait_ready(self) -> None:
        """Return once the server is warm (health SERVING); raises NotReady if the warm-up
        failed or the server stopped first."""
        if self.service.warming is not None:
            await asyncio.shield(self.service.warming)

    def _open_gate(self, error: BaseException | None = None) -> None:
        gate = self.service.warming
        if gate is None or gate.done():
            return
        if error is None:
            gate.set_result(None)
        else:
            gate.set_exception(error)
            gate.exception()           # retrieved: no "never retrieved" log without waiters

    async def _warm(self) -> None:
        start = time.monotonic()
        try:
            await asyncio.to_thread(self.engine.warm_up)
            stats = await asyncio.to_thread(self.engine.stats)
        except Exception as e:
            log.error("warm-up failed: turns end UNAVAILABLE", exc_info=e)
            self._open_gate(NotReady(f"the engine failed to warm up: {type(e).__name__}: {e}"))
            return
        self.warm_s = time.monotonic() - start
        self.programs = stats.get("programs") if isinstance(stats, dict) else None
        if self._server is None or self.service.draining:
            return
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._open_gate()
        log.info("warm after %.1f s%s: health SERVING", self.warm_s, describe_programs(
            self.programs))

    async def start(self) -> int:
        server = grpc.aio.server(options=self._options)
        pb_grpc.add_PensieveServicer_to_server(self.service, server)
        pb_grpc.add_MemPoolServicer_to_server(self.mempool, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, MEMPOOL_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = server.add_insecure_port(f"{self.host}:{self.requested_port}")
        await server.start()
        self._server = server
        status = health_pb2.HealthCheckResponse
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status.NOT_SERVING if self.warm_up else status.SERVING)
        if self.warm_up:
            self.service.warming = asyncio.get_running_loop().create_future()
            self._warming = asyncio.create_task(self._warm())
        if self.service.ttl is not None:
            self._expiry = asyncio.create_task(self.service.expire_loop())
        return self.port

    async def shutdown(self, grace: float = 5.0) -> None:
        """Take no new calls; let in-flight turns finish for up to `grace` seconds, then cancel
        them (each stream still ends cleanly, with finish_reason "abort")."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        self._open_gate(NotReady("the server stopped before its engine was warm"))
        stopping = asyncio.create_task(self._server.stop(grace + 10.0))   # new calls: UNAVAILABLE
        await self.service.drain(grace)
        await stopping
        if self._expiry is not None:
            self._expiry.cancel()
        if self._warming is not None:
            self._warming.cancel()           # its thread finishes the warm-up on its own
        await self.mempool.close()
        self.service.close()
        self._server = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class BackgroundServer:
    """A PensieveServer on its own thread and event loop. `target` is its address.

        with BackgroundServer(engine) as server:
            chat = serving.client.connect(server.target).session()
    """

    def __init__(self, engine: Engine, host: str = DEFAULT_HOST, port: int = 0, **kwargs):
        self.server = PensieveServer(engine, host, port, **kwargs)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),),
                                        name="pensieve-grpc", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.server.start()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()

    @property
    def target(self) -> str:
        return self.server.target

    @property
    def service(self) -> PensieveService:
        return self.server.service

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the server is warm (health SERVING); NotReady if its warm-up failed."""
        asyncio.run_coroutine_threadsafe(self.server.wait_ready(), self._loop).result(timeout)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's event loop (for inspection); returns its result."""
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def stop(self, grace: float = 1.0) -> None:
        if not self._thread.is_alive():
            return

        async def stop():
            await self.server.shutdown(grace)
            self._stop.set()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result()
        self._thread.join()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def describe_programs(programs: dict | None) -> str:
    """' (N programs compiled in S s)' from engine.stats()["programs"], or ''."""
    if not isinstance(programs, dict) or "count" not in programs:
        return ""
    seconds = programs.get("compile_s")
    took = f" in {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
    return f" ({programs['count']} programs compiled{took})"


__all__ = ["BackgroundServer", "DEFAULT_HOST", "PensieveServer", "PensieveService",
           "SERVICE_NAME", "describe_programs", "warm_up_later"]
