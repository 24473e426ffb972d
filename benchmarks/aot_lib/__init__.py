"""The parts of benchmarks/aot_compile.py (the command line, the run per target and the source
hash live there):

    targets          a GPU as a GpuTargetConfig text proto; its compile-only devices
    compile          one program lowered and compiled for a target, and what it holds
    ptxas            registers, spills and stack of its Triton kernels (ptxas -v)
    memory_plan      what the engine would allocate on the card, and whether a program fits
    engine_programs  the engine's step and page programs on abstract parameters and pools
    kernel_sweep     the Pallas kernel alone over page sizes, head layouts, mixes and dtypes
    report           per-group summaries, the table, a line per program

They import jax: aot_compile.py sets JAX_PLATFORMS and puts the CUDA plugin on sys.path first.
"""
