"""gRPC serving for Pensieve-JAX: the pensieve.v1 service (proto/pensieve/v1/pensieve.proto).

    serving.server   PensieveServer (grpc.aio) and BackgroundServer over an Engine; Metrics
    serving.client   connect(target).session(system=...): the Session API, remote
    serving.cli      `pensieve serve` / `pensieve chat` (also `python -m serving`)
    serving.mempool  MemPool: KV transfer between replicas, the transfer/recompute cost model
                     (on a server's internal port only, behind the cluster secret)
    serving.auth     API keys and owners, the cluster secret; serving.interceptors: the
                     server interceptors that check them; serving.tls: certificates
    serving.limits   what a request may ask (size, conversations)
    serving.errors   exceptions <-> gRPC status codes
    serving.pensieve.v1  generated stubs (python -m serving.codegen)
"""
