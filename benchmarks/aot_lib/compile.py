"""One program compiled for a target (aot_compile.py): lowered, compiled with XLA dumping its
PTX (once more with known options where a compile-only device is the cause of the error), and
what the compiled program holds: the Triton calls, XLA's memory analysis and warnings, and
ptxas's report of its kernels.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from benchmarks.aot_lib.ptxas import kernel_summary, ptx_files, ptxas_reports, triton_kernel_names
from benchmarks.aot_lib.targets import Target

TRITON_CALL = "__gpu$xla.gpu.triton"


def memory(compiled) -> dict[str, int] | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return {k: int(getattr(stats, f"{k}_size_in_bytes"))
            for k in ("argument", "output", "alias", "temp", "generated_code")}


# Compile errors that only a compile-only device causes, and the options that avoid them (the
# row records the first error, the options and why).
RETRIES = (
    ("cudaErrorInvalidDevice", {"xla_gpu_enable_cub_radix_sort": False},
     "XLA's CUB radix sort (chosen where XLA has deviceless CUB data for the card, e.g. the "
     "H100) asks the CUDA runtime for a device while compiling, and a compile-only device is "
     "none: compiled with XLA's own sort instead, as XLA does for cards without that data "
     "(the H200); on a GPU the CUB sort compiles"),
)


def compile_program(name: str, group: str, target: Target, lower: Callable[[], Any],
                    needs_triton: bool, ptxas: str | None, **info) -> dict[str, Any]:
    """Lower and compile one program for the target; what it holds, or the error."""
    row: dict[str, Any] = {"name": name, "group": group, "target": target.name, **info,
                           "needs_triton": needs_triton}
    with tempfile.TemporaryDirectory(prefix="aot-") as tmp:
        dump = dump_dir(tmp, target, name)
        log_path = Path(tmp) / "xla.log"
        try:
            start = time.perf_counter()
            lowered = lower()
            row["lower_s"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            with stderr_to(log_path):
                compiled = compile_lowered(lowered, dump, row)
            row["compile_s"] = round(time.perf_counter() - start, 2)
        except Exception as e:  # noqa: BLE001 - recorded: the JSON says what failed and why
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:4000],
                       traceback=traceback.format_exc()[-3000:])
            return row
        finally:
            row["xla_warnings"] = xla_warnings(log_path)
        text = compiled.as_text()
        row["ok"] = True
        row["triton_calls"] = text.count(f'custom_call_target="{TRITON_CALL}"')
        row["triton"] = row["triton_calls"] > 0
        row["memory"] = memory(compiled)
        if ptxas is None:
            row["kernels_error"] = "no ptxas found"
        else:
            names = triton_kernel_names(text)
            row.update(kernel_summary(ptxas_reports(ptx_files(dump, names), ptxas), names))
    if needs_triton and not row["triton"]:
        row["ok"] = False
        row["error"] = ("no Triton custom call in the compiled program: the Pallas kernel was "
                        "interpreted, not compiled")
    return row


def compile_lowered(lowered, dump: Path, row: dict[str, Any]):
    """lowered.compile() dumping to `dump`; once more with a RETRIES entry's options when the
    error is one a compile-only device causes (row gets first_error, compile_options, note)."""
    options = {"xla_dump_to": str(dump), "xla_dump_hlo_as_text": DUMP_ROOT is not None}
    try:
        return lowered.compile(compiler_options=options)
    except Exception as e:  # noqa: BLE001 - retried below where the cause is known
        retry = next((r for r in RETRIES if r[0] in str(e)), None)
        if retry is None:
            raise
        shutil.rmtree(dump, ignore_errors=True)
        row.update(first_error=f"{type(e).__name__}: {e}"[:1000], compile_options=retry[1],
                   note=retry[2])
        return lowered.compile(compiler_options={**options, **retry[1]})


DUMP_ROOT = os.environ.get("AOT_DUMP_DIR")   # keep XLA's dumps (HLO text too) under this folder


def dump_dir(tmp: str, target: Target, name: str) -> Path:
    """Where XLA dumps one program (its PTX is read from there): a temporary folder, or
    AOT_DUMP_DIR/<target>/<program> to keep."""
    if DUMP_ROOT is None:
        return Path(tmp) / "dump"
    return Path(DUMP_ROOT) / target.name / re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


@contextlib.contextmanager
def stderr_to(path: Path):
    """File descriptor 2 (where XLA logs) into path while the block runs."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def xla_warnings(path: Path) -> list[str]:
    """XLA's warning and error lines from a captured log ("file.cc: message"), once each."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if m := re.match(r"^[WE]\d{4} [\d:.]+\s+\d+ ([^\]]+)\] (.*)", line):
            out.append(f"{m.group(1).split(':')[0]}: {m.group(2).strip()}"[:400])
    return list(dict.fromkeys(out))
