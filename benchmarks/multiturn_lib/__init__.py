"""The parts of benchmarks/multiturn.py (the command line and its docs live there):

    turns          what one turn produced (TurnRecord, TurnResult), the text-mode turn
    engine_target  the engine in this process (EngineTarget; times every model step)
    grpc_target    a Pensieve gRPC server (GrpcTarget)
    hf_peer        transformers `generate` as a stateless peer (HFTarget), here or in another
                   interpreter
    replay         closed-loop users replaying a workload against a target
    measure        warm-up passes, the measured pass, page sampling
    metrics        throughput, latency percentiles, TTFT by turn, step profile, equal-latency
                   comparisons
    precompile     the engine's step programs compiled up front (warm_up), JAX's persistent
                   compilation cache
    runners        the engines per cache policy, a remote server, the peer: load point by point
    report         merging runs, the comparisons, the JSON and the plots (plots)

Only numpy is imported at import time (jax, the engine, serving, torch: inside the functions
that need them), so the HF peer can run this code in an interpreter without jax.
"""
