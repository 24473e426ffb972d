"""Registers, spills and stack of the Triton kernels in a compiled program: the entry names
from its HLO (XLA's Triton fusions and the Pallas calls), their PTX from XLA's dump, and
ptxas -v over it with the options XLA gives ptxas.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

PALLAS_PREFIX = "ragged_paged_attention"


@dataclasses.dataclass(frozen=True)
class KernelReport:
    """ptxas -v of one GPU kernel (entry function)."""

    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int


def find_ptxas() -> str | None:
    """The ptxas XLA uses: nvidia-cuda-nvcc's (nvidia/cu13/bin), else one on PATH."""
    for entry in sys.path:
        candidate = Path(entry) / "nvidia" / "cu13" / "bin" / "ptxas"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("ptxas")


PTXAS_OPTIONS = ("-arch=sm_90a", "--warn-on-spills", "-v")   # as XLA runs it (its verbose log)


def ptxas_reports(ptx_files: list[Path], ptxas: str) -> list[KernelReport]:
    """Registers and spills of every entry function in the PTX files."""
    reports = []
    for path in ptx_files:
        out = subprocess.run([ptxas, str(path), "-o", os.devnull, *PTXAS_OPTIONS],
                             capture_output=True, text=True, timeout=600)
        reports += parse_ptxas(out.stdout + out.stderr)
    return reports


def parse_ptxas(text: str) -> list[KernelReport]:
    """KernelReports from ptxas -v output."""
    reports, name, props = [], None, {}
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            name, props = m.group(1), {}
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                            r"(\d+) bytes spill loads", line):
            props.update(stack=int(m.group(1)), stores=int(m.group(2)), loads=int(m.group(3)))
        elif (m := re.search(r"Used (\d+) registers", line)) and name:
            reports.append(KernelReport(name, int(m.group(1)), props.get("stores", 0),
                                        props.get("loads", 0), props.get("stack", 0)))
            name = None
    return reports


def _entry_name(hlo_name: str) -> str:
    """A kernel's PTX entry name from its HLO instruction name (fusion.82 -> fusion_82)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", hlo_name)


def triton_kernel_names(hlo_text: str) -> set[str]:
    """PTX entry names of the Triton kernels of a compiled program: XLA's Triton fusions
    (fusion kinds __triton*) and the Pallas calls (custom call __gpu$xla.gpu.triton; the
    kernel keeps its pallas_call name, matched by prefix)."""
    names = set()
    for m in re.finditer(r"%([\w.-]+) = [^\n]*?fusion\([^\n]*\"kind\":\"__triton", hlo_text):
        names.add(_entry_name(m.group(1)))
    return names


def ptx_files(dump: Path, names: set[str]) -> list[Path]:
    """The dumped PTX files holding a Triton kernel (only these go through ptxas -v again)."""
    out = []
    for path in sorted(dump.glob("*.ptx")):
        entries = re.findall(r"^\.visible \.entry (\w+)", path.read_text(), re.M)
        if any(e in names or e.startswith(PALLAS_PREFIX) for e in entries):
            out.append(path)
    return out


def kernel_summary(kernels: list[KernelReport], names: set[str]) -> dict[str, Any]:
    """ptxas's report of every Triton kernel (the Pallas ones apart), worst registers, spills."""
    kernels = [k for k in kernels if k.name in names or k.name.startswith(PALLAS_PREFIX)]
    pallas = [dataclasses.asdict(k) for k in kernels if k.name.startswith(PALLAS_PREFIX)]
    return {"pallas_kernels": pallas,
            "xla_triton_kernels": [dataclasses.asdict(k) for k in kernels
                                   if not k.name.startswith(PALLAS_PREFIX)],
            "max_registers": max((k.registers for k in kernels), default=0),
            "spill_bytes": sum(k.spill_stores + k.spill_loads for k in kernels),
            "spilling_kernels": [k.name for k in kernels if k.spill_stores or k.spill_loads]}
