"""The router: one pensieve.v1.Pensieve endpoint in front of N replica servers.

    router = RouterServer(["127.0.0.1:50061", "127.0.0.1:50062"], policy="e2",
                          tokenizer=load_router_tokenizer("random:tiny"), port=50051)
    await router.start() ... await router.shutdown()

Clients use it exactly like one server. Each call goes to one replica, picked by the policy
(serving/routing.py: round-robin, conversation affinity, or Preble's E2 over the global prefix
tree in serving/prefix_tree.py). Conversation ids are the router's own; the router keeps each
conversation's history and its id on every replica that served it. A turn sent to a replica
that does not hold the conversation's latest turns (round-robin, a rebalance, a failover) sends
the missing messages with the conversation's exact token ids (history_token_ids), so the
replica recomputes them and the reply is the one the old replica would have given.

The service is put together from mixins, one concern each: serving/router_kv.py (moving KV
between replicas through MemPool; prefill/decode disaggregation), serving/router_forget.py
(EndConversation; forgetting idle conversations), serving/router_reports.py (health checks,
cache reports, GetStats). What it keeps is in serving/router_state.py, its errors in
serving/router_errors.py.

Failures: a replica whose call fails with UNAVAILABLE (or whose gRPC health check fails) is
marked down; its prefix-tree entries are dropped and the turn runs again on another replica.
If part of the reply had already been streamed, the replay skips what the client has (only
for deterministic sampling: temperature 0 or a seed; otherwise the call ends UNAVAILABLE and
the conversation stays at its previous turn). The health loop marks it up again when it
answers, and reads each replica's cache size for the tree's LRU capacity estimate.

Cache salts (tenant isolation): replicas share cached pages only between requests of the same
cache_salt. A conversation keeps the salt of its first turn (`Conversation.salt`): every
ChatRequest for it carries that salt (on whichever replica, recomputed there or not), prefills
for it run under it, and the KV moved for it is matched under it. A later turn may leave
cache_salt empty (the conversation's own) or repeat it; another salt is INVALID_ARGUMENT, as
on a single server. The prefix tree keeps each
salt's prefixes apart (chat turns, Generate prompts, the salts in cache reports), so routing
never counts another tenant's identical prefix as cached.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import AsyncIterator, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pensieve_jax.session import check_messages, turn_messages
from serving.errors import ConversationNotFound, TurnInProgress, status_for
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.prefix_tree import PrefixTree
from serving.protocol import messages_from_proto, messages_to_proto, sampling_from_proto
from serving.mempool import CostModel
from serving.router_errors import _RETRY, NoReplica, _Remote, _ReplicaAbort
from serving.router_forget import ForgetMixin
from serving.router_kv import KVMixin
from serving.router_reports import ReportsMixin
from serving.router_state import ROLES, SERVICE_NAME, ChatKeys, Conversation, \
    ConversationTable, Counters, Generated, MoveCounters, Replica
from serving.routing import POLICIES, Candidate, Decision, E2Config, RoundRobin, \
    affinity_choose, e2_choose

log = logging.getLogger(__name__)
KV_MOVES = ("auto", "transfer", "recompute")
MAX_CONVERSATIONS = 10_000     # default cap on the conversations the router remembers


def _expired(context) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


class RouterService(KVMixin, ForgetMixin, ReportsMixin, pb_grpc.PensieveServicer):
    def __init__(self, targets: Sequence[str], policy: str = "e2", tokenizer=None,
                 e2: E2Config = E2Config(), window_s: float = 60.0, kv_move: str = "auto",
                 roles: Sequence[str] | None = None, cost: CostModel | None = None,
                 cache_report_interval_s: float = 1.0, conversation_ttl_s: float | None = None,
                 max_conversations: int | None = MAX_CONVERSATIONS,
                 clock: Callable[[], float] = time.monotonic):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if kv_move not in KV_MOVES:
            raise ValueError(f"kv_move must be one of {KV_MOVES}, got {kv_move!r}")
        if roles is not None and (len(roles) != len(targets) or set(roles) - set(ROLES)):
            raise ValueError(f"roles must be one of {ROLES} per replica, got {roles!r}")
        if not targets:
            raise ValueError("the router needs at least one replica target")
        self.policy = policy
        self.e2 = e2 if policy == "e2" else E2Config(affinity=policy == "affinity")
        self.keys = ChatKeys(tokenizer)
        self.replicas = [Replica(i, t, window_s) for i, t in enumerate(targets)]
        for r, role in zip(self.replicas, roles or ()):
            r.role, r.role_fixed = role, True
        self.kv_move = kv_move
        self.cost = cost or CostModel()
        self.moves = MoveCounters()                   # conversations moved between replicas
        self.disagg = {"prefills": 0, "to_decode": MoveCounters(),
                       "to_prefill": MoveCounters()}
        self.tree = PrefixTree()
        self.rr = RoundRobin()
        # router conversation id -> Conversation; Generate result id -> Generated
        self.conversations = ConversationTable(conversation_ttl_s, max_conversations, clock)
        self.generated = ConversationTable(conversation_ttl_s, max_conversations, clock)
        self.forgotten = {"conversations": dict.fromkeys(("ended", "expired", "evicted"), 0),
                          "generations": dict.fromkeys(("ended", "expired", "evicted"), 0)}
        self._ending: set[asyncio.Task] = set()      # ends of forgotten copies on replicas
        self.counters: dict[str, Counters] = {}
        self.events = dict.fromkeys(("failovers", "replays", "rebalances", "moves",
                                     "replica_not_found", "tree_evicted_tokens"), 0)
        self.reasons: dict[str, int] = {}
        self.active_streams = 0
        self.cache_report_interval_s = cache_report_interval_s
        self.reports = dict.fromkeys((
            "received", "changed", "full", "failed", "resyncs",
            "evictions_learnt", "evicted_tokens_learnt",      # the tree stopped crediting these
            "inserts_learnt", "inserted_tokens_learnt",       # ... started crediting these
            "estimate_dropped_tokens"), 0)   # routed estimates a first report did not confirm

    def connect(self) -> None:
        for r in self.replicas:
            r.connect()

    async def close(self) -> None:
        if self._ending:          # ends of forgotten conversations still on their way
            await asyncio.wait(list(self._ending), timeout=5)
            for task in list(self._ending):
                task.cancel()
        for r in self.replicas:
            if r.channel is not None:
                await r.channel.close()

    # -- RPCs -----------------------------------------------------------------------------------

    async def Chat(self, request: pb.ChatRequest, context):
        async for response in self._guard(context, self._chat(request, context)):
            yield response

    async def Generate(self, request: pb.GenerateRequest, context):
        async for response in self._guard(context, self._generate(request, context)):
            yield response

    async def EndConversation(self, request: pb.EndConversationRequest, context):
        try:
            return await self._end(request.conversation_id)
        except Exception as e:
            await self._abort(context, e)

    async def GetStats(self, request: pb.GetStatsRequest, context):
        return await self._stats()

    async def _guard(self, context, responses: AsyncIterator) -> AsyncIterator:
        self.active_streams += 1
        error = None
        try:
            async for response in responses:
                yield response
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error = e
        finally:
            await responses.aclose()
            self.active_streams -= 1
        if error is not None:
            await self._abort(context, error)

    @staticmethod
    async def _abort(context, error: Exception) -> None:
        if isinstance(error, _Remote):
            code, message = error.code, error.details
        elif isinstance(error, NoReplica):
            code, message = grpc.StatusCode.UNAVAILABLE, str(error)
        else:
            code, message = status_for(error)
            if code == grpc.StatusCode.INTERNAL:
                log.error("router call failed", exc_info=error)
        await context.abort(code, message)

    # -- routing --------------------------------------------------------------------------------

    def _candidates(self, ids: list[int], roles: tuple[str, ...] = ROLES,
                    salt: str = "") -> list[Candidate]:
        match = self.tree.match(ids, salt)
        now = time.monotonic()
        return [Candidate(r.index, r.load(now), match.get(r.index, 0),
                          self.tree.cached_tokens(r.index), r.capacity)
                for r in self.replicas if r.healthy and r.role in roles]

    def route(self, ids: list[int], home: int | None,
              roles: tuple[str, ...] = ROLES, salt: str = "") -> Decision:
        """The replica for a request of `ids` under cache salt `salt` (home: the
        conversation's replica, if any), among healthy replicas of the given roles."""
        candidates = self._candidates(ids, roles, salt)
        if not candidates:
            raise NoReplica("no replica is available (all failed their health checks)")
        if self.policy == "round-robin":
            decision = self.rr.choose(candidates)
        elif self.policy == "affinity":
            decision = affinity_choose(candidates, home, self.rr)
        else:
            decision = e2_choose(candidates, len(ids), self.e2, home)
        self.reasons[decision.reason] = self.reasons.get(decision.reason, 0) + 1
        if decision.reason == "rebalance":
            self.events["rebalances"] += 1
        return decision

    def mark_down(self, replica: Replica, why: str) -> None:
        if not replica.healthy:
            return
        log.warning("replica %s (%s) is down: %s", replica.index, replica.target, why)
        replica.healthy = False
        replica.failures += 1
        self.tree.drop_replica(replica.index)
        replica.report_epoch, replica.report_version = "", 0    # a full report when it is back
        replica.reported.clear()
        replica.learnt.clear()

    def _learn(self, replica: Replica, ids: list[int], key: str | None, salt: str = "") -> None:
        """Credit replica with ids under cache salt `salt` (a turn it ran, KV pushed to it). A
        replica that reports its cache gets a holder keyed by its conversation id (its next
        report confirms or corrects it); others the LRU estimate."""
        now = time.monotonic()
        if replica.reports and self.keys.exact:
            if key:
                self.tree.hold(ids, replica.index, key, now, salt)
                replica.learnt[key] = now
            return
        self.tree.insert(ids, replica.index, now, salt)
        if replica.capacity:
            self.events["tree_evicted_tokens"] += self.tree.evict(replica.index, replica.capacity)

    def _count(self, usage: pb.Usage, predicted: int) -> None:
        c = self.counters.setdefault(self.policy, Counters())
        c.turns += 1
        c.prompt_tokens += usage.prompt_tokens
        c.cached_tokens += usage.cached_tokens
        c.predicted_tokens += predicted
        c.completion_tokens += usage.completion_tokens

    # -- Chat -----------------------------------------------------------------------------------

    async def _chat(self, request: pb.ChatRequest, context) -> AsyncIterator[pb.ChatResponse]:
        sampling_from_proto(request.sampling)              # INVALID_ARGUMENT before routing
        messages = messages_from_proto(request.messages)
        if not messages:
            raise ValueError("no messages: send the new turn's messages (with a conversation_id) "
                             "or the whole history (without one)")
        if request.history_token_ids:
            raise ValueError("history_token_ids is for servers behind a router; the router "
                             "keeps conversation histories itself")
        if request.conversation_id:
            conv = self._lookup(request.conversation_id)
            if conv is None:
                raise ConversationNotFound(
                    f"no conversation {request.conversation_id!r}: it was never started, was "
                    "ended, or was forgotten (idle too long, or too many conversations); send "
                    "the whole history without a conversation_id to start it again")
            if request.cache_salt and request.cache_salt != conv.salt:
                raise ValueError(
                    f"cache_salt does not match conversation {conv.id!r}: a conversation keeps "
                    "the cache_salt it began with; send that salt, or none, with its turns")
            if conv.busy:
                raise TurnInProgress(f"conversation {conv.id!r} has a turn in progress; send the "
                                     "next turn after it finished")
            turn = turn_messages(messages)
            self.conversations.touch(conv.id, conv)
        else:
            messages = check_messages(messages)
            turn = turn_messages(messages[-1:])
            conv = Conversation.new(messages[:-1], request.cache_salt)
        conv.busy = True
        try:
            async for response in self._run_turn(conv, turn, request.sampling, context):
                yield response
        finally:
            conv.busy = False
            if conv.dropped:          # ended while its turn ran: end its copies now
                self._end_later(conv.replica_ids())
            elif conv.id in self.conversations:
                self.conversations.touch(conv.id, conv)

    def _replica_request(self, conv: Conversation, r: Replica, turn, sampling) -> pb.ChatRequest:
        cid = conv.cids.get(r.index)
        start = conv.covered.get(r.index, 0) if cid else 0
        messages = conv.template[start:] + turn
        exact = self.keys.exact and conv.ids and start < len(conv.template)
        return pb.ChatRequest(conversation_id=cid or "", messages=messages_to_proto(messages),
                              sampling=sampling, history_token_ids=conv.ids if exact else [],
                              cache_salt=conv.salt)

    async def _run_turn(self, conv: Conversation, turn, sampling: pb.SamplingParams, context):
        ids = self.keys.prompt_ids(conv.template, conv.ids, turn)
        deterministic = sampling.temperature == 0 or sampling.HasField("seed")
        sent_text, sent_ids, accepted = 0, 0, False
        moved_from = conv.home
        forced = await self._disaggregate(conv, ids) if self.disaggregated() else None
        while True:
            decision, forced = forced or self.route(ids, conv.home, salt=conv.salt), None
            r = self.replicas[decision.replica]
            home = self.replicas[conv.home] if conv.home is not None else None
            if home is not None and home is not r and home.healthy and \
                    conv.covered.get(r.index, 0) < len(conv.template):
                await self._move(conv, home, r, self.moves)
            request = self._replica_request(conv, r, turn, sampling)
            text, gen = [], []
            final = None
            call = r.stub.Chat(request, timeout=context.time_remaining())
            r.in_flight += 1
            r.routed += 1
            r.add_load(len(ids) - decision.matched)
            try:
                async for resp in call:
                    if resp.conversation_id and r.index not in conv.cids:
                        conv.cids[r.index] = resp.conversation_id
                    if not accepted:
                        accepted = True
                        self._remember(conv)
                        yield pb.ChatResponse(conversation_id=conv.id)
                    if resp.finish_reason == "abort" and not _expired(context):
                        # not our cancel: the replica stopped the turn (it is shutting down)
                        raise _ReplicaAbort(r.target)
                    text.append(resp.text)
                    gen.extend(resp.token_ids)
                    if resp.finish_reason:
                        final = resp
                    joined = "".join(text)
                    out_text, out_ids = joined[sent_text:], gen[sent_ids:]
                    sent_text, sent_ids = max(sent_text, len(joined)), max(sent_ids, len(gen))
                    if out_text or out_ids or final is not None:
                        yield pb.ChatResponse(conversation_id=conv.id, text=out_text,
                                              token_ids=out_ids,
                                              finish_reason=final.finish_reason if final else "",
                                              usage=final.usage if final else None)
            except (grpc.aio.AioRpcError, _ReplicaAbort) as e:
                call.cancel()
                code = e.code()
                if code == grpc.StatusCode.NOT_FOUND and request.conversation_id:
                    conv.forget_replica(r.index)        # expired or restarted there: start anew
                    self.events["replica_not_found"] += 1
                    continue
                if code not in _RETRY:
                    raise _Remote(code, e.details() or code.name) from None
                self.mark_down(r, f"{code.name}: {e.details()}")
                conv.forget_replica(r.index)
                if sent_ids and not deterministic:
                    raise _Remote(grpc.StatusCode.UNAVAILABLE,
                                  f"replica {r.target} failed mid-reply: {e.details()}; the "
                                  "conversation continues from its previous turn: resend this "
                                  "turn") from None
                self.events["failovers"] += 1
                self.events["replays"] += bool(sent_ids)
                continue
            except asyncio.CancelledError:
                call.cancel()
                if accepted:      # the replica keeps the partial reply: so do we
                    self._finish_turn(conv, r, turn, ids, text, gen, sampling, None, decision)
                raise
            finally:
                r.in_flight -= 1
            break
        self.events["moves"] += moved_from is not None and moved_from != r.index
        self._finish_turn(conv, r, turn, ids, text, gen, sampling, final, decision)

    def _finish_turn(self, conv, r: Replica, turn, ids, text, gen, sampling, final,
                     decision: Decision) -> None:
        joined = "".join(text)
        raw = self.keys.raw_reply(joined, gen, bool(sampling.stop) and final is not None and
                                  final.finish_reason == "stop")
        conv.record(r.index, turn, joined, raw, ids + self.keys.reply_ids(gen))
        self._learn(r, conv.ids if self.keys.exact else
                    self.keys.prompt_ids(conv.template, [], []), conv.cids.get(r.index),
                    conv.salt)
        if final is not None:
            self._count(final.usage, decision.matched)
            r.add_load(self.e2.decode_weight * final.usage.completion_tokens)
            u = final.usage
            self.cost.observe_prefill(u.prefilled_tokens + u.recomputed_tokens, u.ttft_s)

    # -- Generate -------------------------------------------------------------------------------

    async def _generate(self, request: pb.GenerateRequest, context):
        sampling_from_proto(request.sampling)
        which = request.WhichOneof("prompt")
        if which is None:
            raise ValueError("no prompt: set text or token_ids")
        ids = list(request.token_ids.ids) if which == "token_ids" else \
            self.keys.generate_ids(request.text)
        salt = request.cache_salt          # forwarded as is (the request goes on unchanged)
        while True:
            decision = self.route(ids, None, salt=salt)
            r = self.replicas[decision.replica]
            r.routed += 1
            r.in_flight += 1
            r.add_load(len(ids) - decision.matched)
            sent = 0
            try:
                async for resp in r.stub.Generate(request, timeout=context.time_remaining()):
                    sent += len(resp.token_ids)
                    if resp.finish_reason:
                        rid = f"gen-{uuid.uuid4().hex[:16]}"
                        self.generated.touch(rid, Generated(r.index, resp.conversation_id))
                        for _ in self.generated.trim():
                            self.forgotten["generations"]["evicted"] += 1
                        self._count(resp.usage, decision.matched)
                        self._learn(r, ids + list(resp.token_ids), resp.conversation_id,
                                    salt)
                        resp.conversation_id = rid
                    yield resp
            except grpc.aio.AioRpcError as e:
                if e.code() not in _RETRY or sent:
                    raise _Remote(e.code(), e.details() or e.code().name) from None
                self.mark_down(r, f"{e.code().name}: {e.details()}")
                self.events["failovers"] += 1
                continue
            finally:
                r.in_flight -= 1
            return


class RouterServer:
    """The router service plus gRPC health and reflection on one port."""

    def __init__(self, targets: Sequence[str], policy: str = "e2", tokenizer=None,
                 host: str = "127.0.0.1", port: int = 0, health_period_s: float = 1.0,
                 **kwargs):
        self.service = RouterService(targets, policy, tokenizer, **kwargs)
        self.host, self.requested_port, self.port = host, port, None
        self.health_period_s = health_period_s
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._loop_task: asyncio.Task | None = None
        self._report_task: asyncio.Task | None = None
        self._expiry_task: asyncio.Task | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> int:
        self.service.connect()
        # one round of health checks first: a replica still warming up (NOT_SERVING) or not
        # there is marked down before any call can be routed to it
        try:
            await asyncio.wait_for(asyncio.gather(
                *(self.service.check(r) for r in self.service.replicas),
                return_exceptions=True), timeout=5)
        except asyncio.TimeoutError:
            pass
        server = grpc.aio.server()
        pb_grpc.add_PensieveServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        self.port = server.add_insecure_port(f"{self.host}:{self.requested_port}")
        await server.start()
        self._server = server
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._loop_task = asyncio.create_task(self.service.health_loop(self.health_period_s))
        period = self.service.cache_report_interval_s
        if period > 0 and self.service.keys.exact:
            self._report_task = asyncio.create_task(self.service.report_loop(period))
        if self.service.conversations.ttl_s is not None:
            self._expiry_task = asyncio.create_task(self.service.expiry_loop())
        return self.port

    async def shutdown(self, grace: float = 5.0) -> None:
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        self._loop_task.cancel()
        for task in (self._report_task, self._expiry_task):
            if task is not None:
                task.cancel()
        await self.service.close()
        self._server = None

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


__all__ = ["MAX_CONVERSATIONS", "NoReplica", "RouterServer", "RouterService", "SERVICE_NAME"]
