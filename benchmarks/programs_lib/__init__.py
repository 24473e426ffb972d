"""The parts of benchmarks/bench_programs.py (the command line, the sizes and the loop over
models, systems and repeats live there):

    counters    what one worker process counts: memory, compilations, samples, padded tokens
    phases      the worker's measured phases: the closed-loop replay and the turn's TTFT
    worker      one process, one engine: start-up timed, then the phases (bench_programs.py
                --worker runs it)
    processes   the parent's side: worktree, cache directories, model preparation, processes
    report      a run's headline row, medians and ratios, the printed table

None of them imports jax or pensieve_jax at import time: the worker drops the editable-install
finders first, so that pensieve_jax comes from the system's checkout (PYTHONPATH).
"""
