"""Generate through the router: a raw prompt, routed like a chat turn (the prefix tree keyed on
its ids under its cache salt), failed over to another replica while nothing was streamed yet.
The result's conversation id is the router's own ("gen-..."), mapped to the replica's for
EndConversation."""

from __future__ import annotations

import grpc

from pensieve_jax.session import check_messages
from serving.auth import new_id, scoped_salt
from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.protocol import messages_from_proto, sampling_from_proto
from serving.router.cache_view import CacheView
from serving.router.chooser import ReplicaChooser
from serving.router.directory import ConversationDirectory
from serving.router.errors import FAILOVER_CODES, RemoteError
from serving.router.keys import ChatKeys
from serving.router.links import Caller
from serving.router.records import Generated
from serving.router.replicas import ReplicaSet
from serving.router.stats import RouterStats


class GenerateCalls:
    """Runs Generate calls on the replica the policy picks."""

    def __init__(self, replicas: ReplicaSet, chooser: ReplicaChooser, cache: CacheView,
                 directory: ConversationDirectory, keys: ChatKeys, stats: RouterStats):
        self.replicas, self.chooser, self.cache = replicas, chooser, cache
        self.directory, self.keys, self.stats = directory, keys, stats

    async def generate(self, request: pb.GenerateRequest, context, caller: Caller = Caller()):
        sampling_from_proto(request.sampling)
        which = request.WhichOneof("prompt")
        if which is None:
            raise ValueError("no prompt: set text or token_ids")
        if which == "token_ids":
            ids = list(request.token_ids.ids)
        elif which == "messages":        # rendered by the replica's chat template, as here
            ids = self.keys.prompt_ids(check_messages(
                messages_from_proto(request.messages.messages)), [], [])
        else:
            ids = self.keys.generate_ids(request.text)
        salt = scoped_salt(caller.owner, request.cache_salt)   # the replicas' engine salt; the
        # request itself goes on unchanged (the replica derives the same salt)
        while True:
            decision = self.chooser.route(ids, None, salt=salt)
            r = self.replicas[decision.replica]
            r.routed += 1
            r.in_flight += 1
            r.add_load(len(ids) - decision.matched)
            sent = 0
            try:
                async for resp in r.stub.Generate(request, timeout=context.time_remaining(),
                                                  metadata=caller.auth or None):
                    sent += len(resp.token_ids)
                    if resp.finish_reason:
                        rid = new_id("gen-")
                        self.directory.remember_generated(
                            rid, Generated(r.index, resp.conversation_id, caller=caller))
                        self.chooser.turn_done(resp.usage, decision.matched)
                        self.cache.learn(r, ids + list(resp.token_ids), resp.conversation_id,
                                         salt)
                        resp.conversation_id = rid
                    yield resp
            except grpc.aio.AioRpcError as e:
                if e.code() not in FAILOVER_CODES or sent:
                    raise RemoteError(e.code(), e.details() or e.code().name) from None
                self.replicas.mark_down(r, f"{e.code().name}: {e.details()}")
                self.stats.event("failovers")
                continue
            finally:
                r.in_flight -= 1
            return


__all__ = ["GenerateCalls"]
