"""The replica set's channels: the service config retries idempotent calls on UNAVAILABLE (a
replica restarting, a connection lost), and never Chat (the router fails it over itself)."""

import asyncio

import grpc

from serving.pensieve.v1 import pensieve_pb2 as pb
from serving.pensieve.v1 import pensieve_pb2_grpc as pb_grpc
from serving.router import ReplicaSet


class Flaky(pb_grpc.PensieveServicer):
    """Fails each call UNAVAILABLE `failures` times, then answers."""

    def __init__(self, failures: int):
        self.failures, self.calls = failures, {"GetStats": 0, "Chat": 0}

    async def _fail(self, name, context) -> None:
        self.calls[name] += 1
        if self.calls[name] <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")

    async def GetStats(self, request, context):
        await self._fail("GetStats", context)
        return pb.GetStatsResponse(model="flaky")

    async def Chat(self, request, context):
        await self._fail("Chat", context)
        yield pb.ChatResponse(conversation_id="c")


async def calls_through_a_flaky_replica(failures: int):
    service, server = Flaky(failures), grpc.aio.server()
    pb_grpc.add_PensieveServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    replicas = ReplicaSet([f"127.0.0.1:{port}"])
    replicas.connect()
    try:
        stats = await replicas.stats(replicas[0])
        try:
            chat = [r async for r in replicas[0].stub.Chat(pb.ChatRequest(), timeout=5)]
        except grpc.aio.AioRpcError as e:
            chat = e.code()
        return stats, chat, service.calls
    finally:
        await replicas.close()
        await server.stop(0)


def test_idempotent_calls_are_retried_chat_is_not():
    stats, chat, calls = asyncio.run(calls_through_a_flaky_replica(failures=2))
    assert stats.model == "flaky" and calls["GetStats"] == 3      # two retries
    assert chat == grpc.StatusCode.UNAVAILABLE and calls["Chat"] == 1
    stats, _, calls = asyncio.run(calls_through_a_flaky_replica(failures=3))
    assert stats is None and calls["GetStats"] == 3               # at most 3 attempts
