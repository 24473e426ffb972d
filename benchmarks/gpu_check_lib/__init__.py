"""The parts of benchmarks/gpu_check.py (the command line, the phases' order and budgets, the
child processes and the summary live there):

    results           a phase's JSON on disk (written atomically), its Phase record, errors
    phase_process     one phase run in this process: the backend started, the error kept
    environment       phase environment: versions, devices, memory kinds, nvidia-smi
    kernel            phase kernel: the kernel against its reference and JAX's paged attention
    decode_bandwidth  phase decode_bandwidth: decode GB/s against the copy bandwidth
    prefill           phase prefill: paged prefill against contiguous dense attention
    swap              phase swap: host <-> device page copies and how much a step hides
    engine            phase engine: stateful against stateless on a multi-turn replay
"""
