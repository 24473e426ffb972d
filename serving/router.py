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

Failures: a replica whose call fails with UNAVAILABLE (or whose gRPC health check fails) is
marked down; its prefix-tree entries are dropped and the turn runs again on another replica.
If part of the reply had already been streamed, the replay skips what the client has (only
for deterministic sampling: temperature 0 or a seed; otherwise the call ends UNAVAILABLE and
the conversation stays at its previous turn). The health loop marks it up again when it
answers, and reads each replica's cache size for the tree's LRU capacity estimate.

Cache reports: every cache_report_interval_s the router polls each replica's
MemPool.CacheReport (pensieve_jax/cache_report.py): per conversation there, the token ids whose
KV it still holds, versioned so that only changes travel. The tree keeps one keyed holder per
replica conversation (`PrefixTree.hold`) and each report resets it: prefixes a replica let go
(evicted, ended, expired) stop counting for it, prefixes it holds that the router did not route
(KV imports, clients that bypass the router) start counting. Between reports, the turns the
router routes are credited at once (a holder keyed by the replica's conversation id, which the
next report confirms or corrects). Replicas that do not implement CacheReport (older servers;
logged once) keep the estimate: what was routed there, aged out by LRU against capacity. Without
a tokenizer the tree is keyed on bytes, not token ids, and reports are not used.

Forgetting: the router's conversations live in a `ConversationTable`. EndConversation forwards
the end to every replica holding a copy and forgets it (a turn in flight finishes first, as on a
replica). An idle conversation is forgotten after conversation_ttl_s (None: never) and, beyond
max_conversations, the least recently used idle one is; either way the router ends its copies
on the replicas (in the background) and drops their holders from the prefix tree, as it does
for EndConversation. A conversation with a turn in flight is never forgotten. Its id is then
unknown (NOT_FOUND, as from a replica whose TTL passed): a client that sends the whole history
again (no conversation_id) starts a new conversation, routed like any other. Generate ids follow
the same TTL and cap, but forgetting one only drops the router's mapping: the engine
conversation that ran it is the replica's anonymous one (later prompts may share its prefix),
left to the replica's own TTL and cache.

Cache salts (tenant isolation): replicas share cached pages only between requests of the same
cache_salt. A conversation keeps the salt of its first turn (`Conversation.salt`): every
ChatRequest for it carries that salt (on whichever replica, recomputed there or not), prefills
for it run under it, and the KV moved for it is matched under it. A later turn may leave
cache_salt empty (the conversation's own) or repeat it; another salt is INVALID_ARGUMENT (a
replica keeps a continued conversation's salt whatever the turn says, so the router refuses
rather than have the turn run under a salt it did not ask for). The prefix tree keeps each
salt's prefixes apart (chat turns, Generate prompts, the salts in cache reports), so routing
never counts another tenant's identical prefix as cached.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable, Sequence

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
from serving.router_state import ChatKeys, Conversation, ConversationTable, Counters, \
    Generated, MoveCounters, Replica
from serving.routing import POLICIES, Candidate, Decision, E2Config, RoundRobin, \
    affinity_choose, e2_choose

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Pensieve"].full_name
_RETRY = (grpc.StatusCode.UNAVAILABLE,)
KV_MOVES = ("auto", "transfer", "recompute")
ROLES = ("prefill", "decode", "both")
MAX_CONVERSATIONS = 10_000     # default cap on the conversations the router remembers


class NoReplica(RuntimeError):
    """No healthy replica can take the call."""


class _Remote(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _ReplicaAbort(Exception):
    """A replica ended a turn with finish_reason "abort" that the router did not ask for."""

    def __init__(self, target: str):
        super().__init__(f"replica {target} aborted the turn (shutting down?)")

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return str(self)


def _expired(context) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


class RouterService(pb_grpc.PensieveServicer):
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

    # -- MemPool: moving KV between replicas ----------------------------------------------------

    async def _transfer(self, src: Replica, src_cid: str, dst: Replica, dst_cid: str,
                        adopt: bool, tokens: list[int], counters: MoveCounters,
                        limit: int | None = None, why: str = "move", force: bool = False,
                        salt: str = ""):
        """Push src's KV of a conversation (of cache salt `salt`) to dst when the cost model (or
        kv_move) says loading it beats recomputing it. Returns the TransferResponse, or None
        (dst recomputes). The KV keeps its salt on dst (the chunks carry the source's)."""
        if self.kv_move == "recompute" and not force:
            counters.recomputes += 1
            return None
        try:
            have, lack = await asyncio.gather(
                src.mempool.Match(pb.MatchRequest(conversation_id=src_cid, token_ids=tokens,
                                                  cache_salt=salt), timeout=10),
                dst.mempool.Match(pb.MatchRequest(conversation_id=dst_cid, token_ids=tokens,
                                                  cache_salt=salt), timeout=10))
            own = lack.conversation_tokens if dst_cid or not adopt else 0
            held = max(own, lack.shared_tokens)
            size = have.layout.page_size or 1
            pages = -(-have.conversation_tokens // size) - own // size
            choice = self.cost.choose(have.conversation_tokens - held,
                                      max(pages, 0) * have.page_bytes)
            transfer = force or self.kv_move == "transfer" or choice.transfer
            log.info("%s %s -> %s: %d tokens (%d bytes): transfer %.4f s vs recompute %.4f s: %s",
                     why, src.target, dst.target, choice.tokens, choice.bytes, choice.transfer_s,
                     choice.recompute_s, "transfer" if transfer else "recompute")
            if not transfer or have.conversation_tokens <= own:
                counters.recomputes += 1
                return None
            reply = await src.mempool.Transfer(pb.TransferRequest(
                conversation_id=src_cid, target=dst.target, target_conversation_id=dst_cid,
                adopt=adopt, limit_tokens=limit), timeout=60)
        except grpc.aio.AioRpcError as e:
            log.warning("%s %s -> %s failed (%s: %s): recomputing", why, src.target, dst.target,
                        e.code().name, e.details())
            counters.failed += 1
            return None
        counters.transfers += 1
        counters.tokens += reply.sent_tokens
        counters.bytes += reply.bytes
        counters.seconds += reply.seconds
        self.cost.observe_transfer(reply.bytes, reply.seconds)
        self._learn(dst, tokens[:reply.num_tokens], reply.target_conversation_id, salt)
        return reply

    async def _move(self, conv: Conversation, src: Replica, dst: Replica,
                    counters: MoveCounters) -> bool:
        """Move conv's KV from src to dst (a rebalance, a failover with src still up, an
        evacuation), when that is cheaper than recomputing it there."""
        src_cid = conv.cids.get(src.index)
        if src_cid is None or not conv.ids:
            return False
        dst_cid = conv.cids.get(dst.index, "")
        reply = await self._transfer(src, src_cid, dst, dst_cid, True, conv.ids, counters,
                                     salt=conv.salt)
        if reply is None:
            return False
        if reply.target_conversation_id != dst_cid:
            conv.cids[dst.index] = reply.target_conversation_id
            conv.covered[dst.index] = 0          # the next Chat sends messages + exact ids
        return True

    async def evacuate(self, index: int) -> int:
        """A replica is leaving (graceful shutdown): route nothing more to it and move the KV
        of every idle conversation living there to another replica (or leave it to be
        recomputed, as the cost model says). Returns how many moved by transfer."""
        src = self.replicas[index]
        src.leaving = True
        self.mark_down(src, "leaving (evacuated)")
        moved = 0
        for conv in list(self.conversations.values()):
            if conv.home != index or conv.busy or not conv.ids:
                continue
            roles = ("decode", "both") if self.disaggregated() else ROLES
            try:
                dst = self.replicas[self.route(conv.ids, None, roles, conv.salt).replica]
            except (LookupError, NoReplica):
                break
            if await self._move(conv, src, dst, self.moves):
                conv.home = dst.index
                moved += 1
                if conv.dropped:      # forgotten while it moved: end the new copy too
                    self._end_later(conv.replica_ids())
        return moved

    # -- prefill/decode disaggregation ----------------------------------------------------------

    def disaggregated(self) -> bool:
        """Some healthy replica only prefills and some healthy replica decodes."""
        up = {r.role for r in self.replicas if r.healthy}
        return "prefill" in up and bool(up & {"decode", "both"})

    async def _disaggregate(self, conv: Conversation, ids: list[int]) -> Decision | None:
        """Run a turn's prompt on a prefill replica and push its KV to the decode replica the
        turn then streams from (returned). Before that, the conversation's KV flows back from
        its decode replica to the prefill replica (MemServe), so only the new turn is
        prefilled. On any failure the decode replica computes what it lacks itself."""
        try:
            p = self.replicas[self.route(ids, None, ("prefill", "both"), conv.salt).replica]
            decode = self.route(ids, conv.home, ("decode", "both"), conv.salt)
        except NoReplica:
            return None
        d = self.replicas[decode.replica]
        if p is d:
            return decode
        home = self.replicas[conv.home] if conv.home is not None else None
        if home is not None and home.healthy and conv.ids and home.index in conv.cids:
            await self._transfer(home, conv.cids[home.index], p, "", False, conv.ids,
                                 self.disagg["to_prefill"], why="KV back to prefill",
                                 salt=conv.salt)
        prefill = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(
            max_tokens=1, temperature=0.0, ignore_eos=True), cache_salt=conv.salt)
        try:
            last = None
            async for resp in p.stub.Generate(prefill, timeout=60):
                last = resp
        except grpc.aio.AioRpcError as e:
            log.warning("prefill on %s failed (%s): decoding replica computes the prompt",
                        p.target, e.code().name)
            if e.code() in _RETRY:
                self.mark_down(p, f"{e.code().name}: {e.details()}")
            return decode
        self.disagg["prefills"] += 1
        p.routed += 1
        p.add_load(last.usage.prefilled_tokens + last.usage.recomputed_tokens)
        conv.engine_only[p.index] = last.conversation_id
        self._learn(p, ids, last.conversation_id, conv.salt)
        reply = await self._transfer(p, last.conversation_id, d, conv.cids.get(d.index, ""),
                                     True, ids, self.disagg["to_decode"], limit=len(ids),
                                     why="prefill to decode", force=True, salt=conv.salt)
        if reply is not None and reply.target_conversation_id != conv.cids.get(d.index):
            conv.cids[d.index] = reply.target_conversation_id
            conv.covered[d.index] = 0
        return decode

    # -- Generate, EndConversation, GetStats ----------------------------------------------------

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

    async def _end(self, cid: str) -> pb.EndConversationResponse:
        if not cid:
            raise ValueError("conversation_id is empty")
        gen = self._lookup_generated(cid)
        if gen is not None:
            self.generated.pop(cid)
            self.forgotten["generations"]["ended"] += 1
            await self._end_on_replicas([(gen.replica, gen.conversation_id)])
            return pb.EndConversationResponse()
        conv = self._lookup(cid)
        if conv is None:
            raise ConversationNotFound(f"no conversation {cid!r}")
        self._forget(conv, "ended", end=False)
        if not conv.busy:            # else _chat ends the copies when the turn is over
            await self._end_on_replicas(conv.replica_ids())
        return pb.EndConversationResponse()

    # -- forgetting conversations -----------------------------------------------------------

    def _lookup(self, cid: str) -> Conversation | None:
        """The conversation `cid`, or None: unknown, or idle past the TTL (forgotten now, in
        case the expiry loop did not come by yet)."""
        conv = self.conversations.get(cid)
        if conv is not None and self.conversations.is_expired(conv):
            self._forget(conv, "expired")
            return None
        return conv

    def _lookup_generated(self, rid: str) -> Generated | None:
        gen = self.generated.get(rid)
        if gen is not None and self.generated.is_expired(gen):
            self.generated.pop(rid)
            self.forgotten["generations"]["expired"] += 1
            return None
        return gen

    def _remember(self, conv: Conversation) -> None:
        """A conversation accepted a turn: it is (still) known, as the most recently used;
        beyond the cap the least recently used idle ones are forgotten."""
        if conv.dropped:
            return
        self.conversations.touch(conv.id, conv)
        for old in self.conversations.trim():
            self._forget(old, "evicted")

    def _forget(self, conv: Conversation, why: str, end: bool = True) -> None:
        """Forget conv (why: ended, expired, evicted). end: end its copies on the replicas in
        the background (a busy one's after its turn)."""
        self.conversations.pop(conv.id)
        if conv.dropped:
            return
        conv.dropped = True
        self.forgotten["conversations"][why] += 1
        if end and not conv.busy:
            self._end_later(conv.replica_ids())

    def expire(self) -> int:
        """Forget the conversations and Generate ids idle for longer than the TTL. Returns how
        many conversations it forgot."""
        expired = self.conversations.expire()
        for conv in expired:
            self._forget(conv, "expired")
        self.forgotten["generations"]["expired"] += len(self.generated.expire())
        return len(expired)

    async def expiry_loop(self) -> None:
        period = min(max(self.conversations.ttl_s / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            try:
                self.expire()
            except Exception:     # keep expiring
                log.exception("forgetting expired conversations failed")

    def _end_later(self, where: list[tuple[int, str]]) -> None:
        if not where:
            return
        task = asyncio.get_running_loop().create_task(self._end_on_replicas(where))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _end_on_replicas(self, where: list[tuple[int, str]]) -> None:
        """End each (replica, its conversation id) there; once it is gone there, its holder
        leaves the prefix tree (the replica's next cache report would say the same)."""
        async def end(index: int, replica_cid: str) -> None:
            r = self.replicas[index]
            try:
                await r.stub.EndConversation(
                    pb.EndConversationRequest(conversation_id=replica_cid), timeout=10)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:     # down, or busy: it still holds
                    log.debug("ending %s on %s failed: %s", replica_cid, r.target, e.code().name)
                    return                                   # it (its reports will say)
            self.tree.hold((), index, replica_cid, time.monotonic())
            r.learnt.pop(replica_cid, None)
        await asyncio.gather(*(end(i, c) for i, c in where))

    async def _replica_stats(self, r: Replica):
        if not r.healthy:
            return None
        try:
            return await r.stub.GetStats(pb.GetStatsRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return None

    def router_stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "policy": self.policy, "events": dict(self.events), "reasons": dict(self.reasons),
            "kv_move": self.kv_move, "kv_moves": self.moves.as_dict(),
            "cost_model": self.cost.as_dict(),
            "disaggregation": {"active": self.disaggregated(),
                               "prefills": self.disagg["prefills"],
                               "to_decode": self.disagg["to_decode"].as_dict(),
                               "to_prefill": self.disagg["to_prefill"].as_dict()},
            "by_policy": {p: c.as_dict() for p, c in self.counters.items()},
            "conversations": len(self.conversations),
            "conversation_table": {
                "held": len(self.conversations), "in_flight": self.conversations.busy(),
                "ttl_s": self.conversations.ttl_s,
                "max_conversations": self.conversations.max_entries or 0,
                **self.forgotten["conversations"],
                "generations": {"held": len(self.generated), **self.forgotten["generations"]}},
            "tree": {"nodes": self.tree.num_nodes(),
                     "salts": len(self.tree.salts()) - 1,     # salted trees held
                     "eviction": "replicas reporting their cache (cache_report 'reporting'): "
                                 "as their reports say; others: LRU against each replica's "
                                 "cache capacity (estimated)"},
            "cache_reports": {"interval_s": self.cache_report_interval_s
                              if self.keys.exact else 0.0, **self.reports},
            "replicas": [{"target": r.target, "healthy": r.healthy, "routed": r.routed,
                          "role": r.role, "leaving": r.leaving,
                          "in_flight": r.in_flight, "load": r.load(now),
                          "failures": r.failures, "capacity_tokens": r.capacity,
                          "tree_tokens": self.tree.cached_tokens(r.index),
                          "cache_report": self._report_mode(r),
                          "reported_conversations": len(r.reported)}
                         for r in self.replicas]}

    def _report_mode(self, r: Replica) -> str:
        if not self.keys.exact or self.cache_report_interval_s <= 0:
            return "off"
        return {None: "pending", True: "reporting", False: "unsupported"}[r.reports]

    async def _stats(self) -> pb.GetStatsResponse:
        stats = await asyncio.gather(*(self._replica_stats(r) for r in self.replicas))
        live = [s for s in stats if s is not None]
        out = pb.GetStatsResponse(model=live[0].model if live else "",
                                  active_streams=self.active_streams,
                                  server_conversations=len(self.conversations))
        for s in live:
            for f in ("running", "waiting", "conversations", "pages_used", "pages_total",
                      "hit_tokens", "miss_tokens"):
                setattr(out, f, getattr(out, f) + getattr(s, f))
        out.stats_json = json.dumps({
            "router": self.router_stats(),
            "replicas": [json.loads(s.stats_json) if s is not None else None for s in stats]},
            sort_keys=True)
        return out

    # -- health ---------------------------------------------------------------------------------

    async def check(self, r: Replica) -> None:
        """One health check of r; while healthy, refresh its cache capacity estimate."""
        if r.leaving:
            return
        try:
            reply = await r.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                         timeout=2)
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as e:
            ok, reply = False, e.code().name
        if not ok:
            self.mark_down(r, f"health check: {reply if isinstance(reply, str) else 'NOT_SERVING'}")
            return
        if not r.healthy:
            log.info("replica %s (%s) is up", r.index, r.target)
            if r.reports is False:
                r.reports = None          # ask again: it may have been upgraded
        r.healthy = True
        s = await self._replica_stats(r)
        if s is not None:
            pages = json.loads(s.stats_json)
            size = pages.get("page_size", 0)
            r.capacity = size * (pages["pages"]["device"]["total"] + pages["pages"]["host"]["total"])
            if not r.role_fixed and pages.get("role") in ROLES:
                r.role = pages["role"]
            if not r.reports:
                self.events["tree_evicted_tokens"] += self.tree.evict(r.index, r.capacity)

    async def health_loop(self, period_s: float) -> None:
        while True:
            await asyncio.gather(*(self.check(r) for r in self.replicas), return_exceptions=True)
            await asyncio.sleep(period_s)

    # -- cache reports --------------------------------------------------------------------------

    async def poll_cache(self, r: Replica) -> None:
        """Ask r what its cache holds (what changed since its last report) and reconcile."""
        if not r.healthy or r.leaving or r.reports is False or not self.keys.exact:
            return
        failures, sent_at = r.failures, time.monotonic()
        request = pb.CacheReportRequest(epoch=r.report_epoch, since_version=r.report_version)
        try:
            reply = await r.mempool.CacheReport(
                request, timeout=max(5.0, 2 * self.cache_report_interval_s))
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                self.reports["failed"] += 1      # down or busy: the health loop decides
                return
            log.warning("replica %s (%s) does not report its cache (MemPool.CacheReport: %s): "
                        "the router estimates it from the turns it routes there",
                        r.index, r.target, e.code().name)
            if r.reports:                        # replaced by an older server: estimate anew
                self.tree.drop_replica(r.index)
                r.reported.clear()
                r.learnt.clear()
            r.reports = False
            return
        if r.healthy and r.failures == failures and r.report_epoch == request.epoch and \
                r.report_version == request.since_version:   # else stale: it went down since
            self.apply_report(r, reply, sent_at)

    def apply_report(self, r: Replica, reply: pb.CacheReportResponse, sent_at: float) -> None:
        """Reconcile the tree with a report of r, asked for at sent_at (router clock).

        Each conversation the report names now holds exactly the tokens it lists (none: removed
        or, in a full report, not listed). Except those the router credited by routing after
        sent_at: the report may predate their turn, so the next one decides. Those credited
        before sent_at and absent from the replica's conversations are let go (routed there but
        not kept: evicted already, or a replica that keeps nothing)."""
        now, stats = time.monotonic(), self.reports
        stats["received"] += 1
        first = not r.reports
        r.reports = True
        pending = {key for key, t in r.learnt.items() if t >= sent_at}
        if reply.full:
            stats["full"] += 1
            listed = {c.conversation_id for c in reply.conversations}
            for key in self.tree.holders(r.index):
                if key not in listed and key not in pending:
                    self._reconcile(r, key, (), now)
            r.reported.clear()
        for c in reply.conversations:
            r.reported.add(c.conversation_id)
            if c.conversation_id not in pending:
                self._reconcile(r, c.conversation_id, c.token_ids, now, c.cache_salt)
        for key in reply.removed:
            r.reported.discard(key)
            if key not in pending:
                self._reconcile(r, key, (), now)
        for key, t in list(r.learnt.items()):
            if t < sent_at:
                del r.learnt[key]
                if key not in r.reported:
                    self._reconcile(r, key, (), now)
        if reply.full:                # what routing credited before reports: the estimate
            dropped = self.tree.drop_unheld(r.index)
            stats["estimate_dropped_tokens" if first else "evicted_tokens_learnt"] += dropped
        stats["changed"] += bool(reply.full or reply.conversations or reply.removed)
        r.report_epoch, r.report_version = reply.epoch, reply.version
        if len(r.reported) != reply.num_conversations:      # out of step: start over
            stats["resyncs"] += 1
            r.report_epoch, r.report_version = "", 0

    def _reconcile(self, r: Replica, key: str, tokens, now: float, salt: str = "") -> None:
        change = self.tree.hold(tokens, r.index, key, now, salt)
        if change < 0:
            self.reports["evictions_learnt"] += 1
            self.reports["evicted_tokens_learnt"] -= change
        elif change > 0:
            self.reports["inserts_learnt"] += 1
            self.reports["inserted_tokens_learnt"] += change

    async def report_loop(self, period_s: float) -> None:
        while True:
            results = await asyncio.gather(*(self.poll_cache(r) for r in self.replicas),
                                           return_exceptions=True)
            for r, result in zip(self.replicas, results):
                if isinstance(result, Exception):
                    log.error("cache report of replica %s failed", r.target, exc_info=result)
            await asyncio.sleep(period_s)


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
