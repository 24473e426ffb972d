"""Peers that bench_peers.py compares Pensieve with: llama.cpp through llama-cpp-python (an
optional benchmark peer, the `peers` extra; never a dependency of the package) on the same
weights, written to an all-F32 GGUF from what our loader produced.

    workloads         the four workloads and one measurement of one
    systems           Pensieve and llama.cpp built from the command line
    pensieve_target   the engine as a target (multiturn_lib's interface)
    llama_cpp_peer    llama.cpp's model and context through its C API (LlamaCpp)
    llama_cpp_target  llama.cpp served as its server does: slots, continuous batching
    f32_gguf          the all-F32 GGUF of our weights, checked against the original
    machine           the load of other processes, the memory bandwidth
    divergence        where the two systems' greedy tokens first differ, and how close a call
    summary           medians, ratios, quietest repeats and the printed table
"""

PENSIEVE, LLAMA = "pensieve", "llama.cpp"     # the systems' names in the results JSON
