"""Chat through the router: a turn of a conversation, run on the replica the policy picks.

Conversation ids are the router's own; the router keeps each conversation's history and its id
on every replica that served it. A turn sent to a replica that does not hold the conversation's
latest turns (round-robin, a rebalance, a failover) sends the missing messages with the
conversation's exact token ids (history_token_ids), so the replica recomputes them and the
reply is the one the old replica would have given.

Failover: a replica whose call fails with UNAVAILABLE (or that aborts the turn on its own) is
marked down and the turn runs again on another replica. If part of the reply had already been
streamed, the replay skips what the client has (only for deterministic sampling: temperature 0
or a seed; otherwise the call ends UNAVAILABLE and the conversation stays at its previous turn).
A replica that no longer knows the conversation (NOT_FOUND) gets its whole history again.

Cache salts: a conversation keeps the salt of its first turn (`Conversation.salt`): every
ChatRequest for it carries that salt, prefills for it run under it, and the KV moved for it is
matched under it. A later turn may leave cache_salt empty or repeat it; another salt is
INVALID_ARGUMENT, as on a single server.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc

from pensieve_jax.session import check_messages, turn_messages
from serving.errors import ConversationNotFound, TurnInProgress, clip
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.protocol import messages_from_proto, messages_to_proto, sampling_from_proto
from serving.router.cache_view import CacheView
from serving.router.chooser import ReplicaChooser
from serving.router.directory import ConversationDirectory
from serving.router.disaggregation import Disaggregator
from serving.router.errors import FAILOVER_CODES, RemoteError, ReplicaAbort
from serving.router.keys import ChatKeys
from serving.router.kv_mover import KVMover
from serving.router.links import Caller
from serving.router.records import Conversation
from serving.router.replicas import Replica, ReplicaSet
from serving.router.routing import Decision
from serving.router.stats import RouterStats


def expired(context) -> bool:
    """Whether the call's deadline has passed."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


class ChatTurns:
    """Runs Chat calls: checks the request, finds or starts the conversation, and streams the
    turn from a replica, failing over to another one when a replica fails."""

    def __init__(self, replicas: ReplicaSet, chooser: ReplicaChooser, cache: CacheView,
                 mover: KVMover, disagg: Disaggregator, directory: ConversationDirectory,
                 keys: ChatKeys, stats: RouterStats):
        self.replicas, self.chooser, self.cache = replicas, chooser, cache
        self.mover, self.disagg, self.directory = mover, disagg, directory
        self.keys, self.stats = keys, stats

    async def chat(self, request: pb.ChatRequest, context,
                   caller: Caller = Caller()) -> AsyncIterator[pb.ChatResponse]:
        sampling_from_proto(request.sampling)              # INVALID_ARGUMENT before routing
        messages = messages_from_proto(request.messages)
        if not messages:
            raise ValueError("no messages: send the new turn's messages (with a conversation_id) "
                             "or the whole history (without one)")
        if request.history_token_ids:
            raise ValueError("history_token_ids is for servers behind a router; the router "
                             "keeps conversation histories itself")
        if request.conversation_id:
            conv = self._continued(request, caller)
            turn = turn_messages(messages)
            self.directory.conversations.touch(conv.id, conv)
        else:
            messages = check_messages(messages)
            turn = turn_messages(messages[-1:])
            conv = Conversation.new(messages[:-1], request.cache_salt, caller)
        conv.busy = True
        try:
            async for response in self._run_turn(conv, turn, request.sampling, context):
                yield response
        finally:
            self.directory.turn_ended(conv)

    def _continued(self, request: pb.ChatRequest, caller: Caller) -> Conversation:
        conv = self.directory.lookup(request.conversation_id)
        if conv is None or conv.owner != caller.owner:     # another owner's: as if unknown
            raise ConversationNotFound(
                f"no conversation {clip(request.conversation_id)}: it was never started, was "
                "ended, or was forgotten (idle too long, or too many conversations); send "
                "the whole history without a conversation_id to start it again")
        if request.cache_salt and request.cache_salt != conv.salt:
            raise ValueError(
                f"cache_salt does not match conversation {clip(conv.id)}: a conversation keeps "
                "the cache_salt it began with; send that salt, or none, with its turns")
        if conv.busy:
            raise TurnInProgress(f"conversation {clip(conv.id)} has a turn in progress; send the "
                                 "next turn after it finished")
        return conv

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
        forced = await self.disagg.prefill(conv, ids) if self.disagg.active() else None
        while True:
            decision, forced = forced or self.chooser.route(ids, conv.home, salt=conv.engine_salt), None
            r = self.replicas[decision.replica]
            home = self.replicas[conv.home] if conv.home is not None else None
            if home is not None and home is not r and home.healthy and \
                    conv.covered.get(r.index, 0) < len(conv.template):
                await self.mover.move(conv, home, r, self.stats.moves)
            request = self._replica_request(conv, r, turn, sampling)
            text, gen = [], []
            final = None
            call = r.stub.Chat(request, timeout=context.time_remaining(),
                               metadata=conv.caller.auth or None)
            r.in_flight += 1
            r.routed += 1
            r.add_load(len(ids) - decision.matched)
            try:
                async for resp in call:
                    if resp.conversation_id and r.index not in conv.cids:
                        conv.cids[r.index] = resp.conversation_id
                    if not accepted:
                        accepted = True
                        self.directory.remember(conv)
                        yield pb.ChatResponse(conversation_id=conv.id)
                    if resp.finish_reason == "abort" and not expired(context):
                        # not our cancel: the replica stopped the turn (it is shutting down)
                        raise ReplicaAbort(r.target)
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
            except (grpc.aio.AioRpcError, ReplicaAbort) as e:
                call.cancel()
                self._failed(conv, r, request, e, replayed=sent_ids > 0,
                             deterministic=deterministic)
                continue
            except asyncio.CancelledError:
                call.cancel()
                if accepted:      # the replica keeps the partial reply: so do we
                    self._finish_turn(conv, r, turn, ids, text, gen, sampling, None, decision)
                raise
            finally:
                r.in_flight -= 1
            break
        self.stats.event("moves", moved_from is not None and moved_from != r.index)
        self._finish_turn(conv, r, turn, ids, text, gen, sampling, final, decision)

    def _failed(self, conv: Conversation, r: Replica, request: pb.ChatRequest, e,
                replayed: bool, deterministic: bool) -> None:
        """Replica r failed the turn with e: raises unless the turn is to run again."""
        code = e.code()
        if code == grpc.StatusCode.NOT_FOUND and request.conversation_id:
            conv.forget_replica(r.index)        # expired or restarted there: start anew
            self.stats.event("replica_not_found")
            return
        if code not in FAILOVER_CODES:
            raise RemoteError(code, e.details() or code.name) from None
        self.replicas.mark_down(r, f"{code.name}: {e.details()}")
        conv.forget_replica(r.index)
        if replayed and not deterministic:
            raise RemoteError(grpc.StatusCode.UNAVAILABLE,
                              f"replica {r.target} failed mid-reply: {e.details()}; the "
                              "conversation continues from its previous turn: resend this "
                              "turn") from None
        self.stats.event("failovers")
        self.stats.event("replays", replayed)

    def _finish_turn(self, conv, r: Replica, turn, ids, text, gen, sampling, final,
                     decision: Decision) -> None:
        joined = "".join(text)
        raw = self.keys.raw_reply(joined, gen, bool(sampling.stop) and final is not None and
                                  final.finish_reason == "stop")
        conv.record(r.index, turn, joined, raw, ids + self.keys.reply_ids(gen))
        self.cache.learn(r, conv.ids if self.keys.exact else
                         self.keys.prompt_ids(conv.template, [], []), conv.cids.get(r.index),
                         conv.engine_salt)
        if final is not None:
            self.chooser.turn_done(final.usage, decision.matched)
            r.add_load(self.chooser.e2.decode_weight * final.usage.completion_tokens)
            u = final.usage
            self.mover.cost.observe_prefill(u.prefilled_tokens + u.recomputed_tokens, u.ttft_s)


__all__ = ["ChatTurns", "expired"]
