"""What the benchmark scripts share: the model and the token range of its random prompts, the
environment header of a results JSON, writing it, a median timer and an optional progress bar.

    model, vocab = model_and_vocab(args.model, args.dtype)
    result = {**environment(argv, __file__), "model": model.source, "rows": rows}
    write_json(args.out, result)

environment() gives the command line, backend, device kind and count, jax version, git commit
and the machine (cpu count and model, memory, python, platform). bench_router and bench_disagg
keep it under "machine", where their results have always had their environment.

Nothing here imports jax at import time: bench_tp sets XLA_FLAGS before jax starts, and the
multiturn HF peer runs this code in an interpreter without jax.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def command_line(argv: Sequence[str] | None = None, script: str | None = None) -> str:
    """`python <script> <arguments>`: the command that reproduces the run. argv: the arguments
    main() was given (None: this process's own command line); script: the script's path, shown
    relative to the working directory when it lies below it."""
    if argv is None:
        return " ".join(["python"] + sys.argv)
    path = Path(script or sys.argv[0]).resolve()
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    return " ".join(["python", str(path)] + list(argv))


def machine() -> dict[str, Any]:
    """The host: "x86_64 16 cpus", the cpu count, python, platform, cpu model and memory (GiB)
    where /proc says."""
    info: dict[str, Any] = {"machine": f"{platform.machine()} {os.cpu_count()} cpus",
                            "cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def git_commit() -> str | None:
    """HEAD of the checkout pensieve_jax is imported from, marked when pensieve_jax/ has
    uncommitted changes; None outside a git checkout."""
    import importlib.util
    spec = importlib.util.find_spec("pensieve_jax")
    where = Path(spec.origin).parent.parent if spec and spec.origin else Path(__file__).parent
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain",
                                "pensieve_jax"], capture_output=True, text=True, timeout=10)
        if out.returncode:
            return None
        return out.stdout.strip() + (" (pensieve_jax modified)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(argv: Sequence[str] | None = None, script: str | None = None) -> dict[str, Any]:
    """The header of every results JSON: command, backend, device (kind of the first device),
    num_devices, jax, git_commit, and machine() (machine, cpus, python, platform, cpu,
    memory_gib)."""
    import jax
    devices = jax.devices()
    return {"command": command_line(argv, script), "backend": jax.default_backend(),
            "device": str(devices[0].device_kind), "num_devices": len(devices),
            "jax": jax.__version__, "git_commit": git_commit(), **machine()}


def model_and_vocab(name: str, dtype: str):
    """(the loaded model, how many token ids both it and its tokenizer take): the range the
    benchmarks draw random prompts from."""
    from pensieve_jax.weights import load_model
    model = load_model(name, dtype)
    return model, min(model.config.vocab_size, model.tokenizer.vocab_size)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(type(o).__name__)


def write_json(path: str | Path, result: dict, *, indent: int = 2, log=sys.stdout) -> None:
    """Write `result` (NumPy scalars as numbers) to path, creating its folder; says so on log."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent, default=_json_default) + "\n")
    print("wrote", path, file=log, flush=True)


def median_s(fn, repeats: int) -> float:
    """Median wall seconds of fn() over `repeats` calls, after one untimed call (compile, first
    touch). fn must block until its work is done."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool = True, **options):
    """A tqdm bar on stderr (options: desc, unit, leave...), or one that shows nothing when
    disabled or tqdm is not installed (the `bench` extra)."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, dynamic_ncols=True, **options)
