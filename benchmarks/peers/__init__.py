"""Peers that bench_peers.py compares Pensieve with: llama.cpp through llama-cpp-python (an
optional benchmark peer, the `peers` extra; never a dependency of the package) on the same
weights, written to an all-F32 GGUF from what our loader produced."""
