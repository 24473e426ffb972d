"""gRPC serving for Pensieve-JAX: the pensieve.v1 service (proto/pensieve/v1/pensieve.proto).

    serving.server   PensieveServer (grpc.aio) and BackgroundServer over an Engine; Metrics
    serving.client   connect(target).session(system=...): the Session API, remote
    serving.cli      `pensieve serve` / `pensieve chat` (also `python -m serving`)
    serving.mempool  MemPool: KV transfer between replicas, the transfer/recompute cost model
    serving.errors   exceptions <-> gRPC status codes
    serving.pensieve.v1  generated stubs (python -m serving.codegen)
"""
