"""Compile the engine's programs for an H200 / H100 ahead of time, on a machine without a GPU.

    make aot            # both targets, every program: benchmarks/results/aot_{h200,h100}.json
    make aot-kernels    # the kernel sweep's CI subset for the H200 (aot_h200_kernels.json)
    python benchmarks/aot_compile.py --out DIR [--target h200|h100|both] [--kernels-only]
                                     [--sweep full|ci] [--tp 1 2] [--smoke]

Needs the CUDA plugin (`jax-cuda13-plugin`, `jax-cuda13-pjrt` at the jaxlib version) and ptxas
(`nvidia-cuda-nvcc`), but no GPU: `make aot` installs them into .venv/aot, which this script
puts on sys.path. Runs with JAX_PLATFORMS=cpu (set unless given). A target is a compile-only
device from a GpuTargetConfig text proto (benchmarks/gpu_targets/*.txtpb) through
`jax.experimental.topologies.get_topology_desc`; `jit(f).lower(...).compile()` on its devices
runs XLA's GPU pipeline: Pallas -> Triton -> PTX (sm_90a) -> ptxas.

What is compiled, per target (the programs ARE the engine's: `runner.jit_step` / `lower_step` /
`jit_page_programs`, the functions ModelRunner jits, on abstract parameters and pools):
  * step      every step program of the default EngineConfig's program set for
              random:llama3-8b bfloat16, attention="pallas" (interpret=False: decided by
              `runner.kernel_interpret` from the target's devices), with the layered-load
              variants (swap_in="layered" with a host tier), on a KV pool sized as the engine
              would size it on that card (`engine_config.pool_pages`, see `memory_plan`);
  * page      the page gather / copy / scatter programs (PAGE_CHUNK pages);
  * step_tp2 / page_tp2   the same with tensor_parallel=2 (a 1x1x2 topology: two GPUs of
              one host), collectives included;
  * kernel    the Pallas kernel alone over a sweep of page sizes, head layouts, token mixes
              (decode-only, mixed, prefill) and dtypes.

Per program the JSON records: compiled or the error, the Triton custom calls in the compiled
program (every program with Pallas attention must have one: without it the kernel was
interpreted), registers / spills / stack of every Triton kernel (the Pallas kernel and XLA's
own Triton fusions: ptxas -v over the PTX that XLA dumps, with the options XLA gives ptxas),
XLA's memory analysis (argument / output / alias / temp bytes) against the memory plan, XLA's
warnings, and lower / compile seconds. Without a GPU XLA cannot autotune (nor size its GPU
sort): these executables prove compilation, registers and memory, not speed.
AOT_DUMP_DIR=DIR keeps XLA's dumps (HLO text, PTX) per program. Exit status 1 when a program
failed to compile or lacks its Triton kernel (spills are reported, not failed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
TARGETS_DIR = ROOT / "benchmarks" / "gpu_targets"
PLUGIN_DIR = ROOT / ".venv" / "aot"        # where `make aot` installs the CUDA plugin and ptxas
sys.path.insert(0, str(ROOT))
if PLUGIN_DIR.is_dir():
    sys.path.append(str(PLUGIN_DIR))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from benchmarks.common import environment, write_json  # noqa: E402
from benchmarks.program_set import program_set  # noqa: E402
from pensieve_jax.model import parallel  # noqa: E402
from pensieve_jax.model.attention import KVCache  # noqa: E402
from pensieve_jax.model.config import PRESETS, ModelConfig  # noqa: E402
from pensieve_jax.engine.config import EngineConfig, page_bytes, pool_pages  # noqa: E402
from pensieve_jax.model.llama import Llama, param_shapes  # noqa: E402
from pensieve_jax.runner.page_programs import (PAGE_CHUNK, jit_page_programs,  # noqa: E402
                                               page_program_args)
from pensieve_jax.runner.step_program import (host_memory_kind, jit_step,  # noqa: E402
                                              kernel_interpret, lower_step, runtime_params)
from pensieve_jax.weights import LoadedModel  # noqa: E402

TRITON_CALL = "__gpu$xla.gpu.triton"
PALLAS_PREFIX = "ragged_paged_attention"
MODEL = "random:llama3-8b"      # the default; --model another random: preset
DTYPE = "bfloat16"
# JAX's GPU client takes this fraction of device memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION)
CLIENT_MEM_FRACTION = 0.75


# -- targets ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU described by a GpuTargetConfig text proto."""

    name: str                 # "h200", "h100"
    proto_path: Path

    @property
    def config_text(self) -> str:
        return self.proto_path.read_text()

    def field(self, name: str) -> str | None:
        """A scalar field of the proto (first occurrence), as text."""
        m = re.search(rf"^\s*{name}:\s*\"?([^\"\n]+)\"?", self.config_text, re.M)
        return m.group(1) if m else None

    @property
    def memory_bytes(self) -> int:
        return int(self.field("device_memory_size"))

    def devices(self, count: int = 1) -> list:
        """`count` compile-only devices of one host (topology 1x1x<count>)."""
        from jax.experimental import topologies
        topo = topologies.get_topology_desc(platform="cuda", target_config=self.config_text,
                                            topology=f"1x1x{count}")
        return list(topo.devices)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "proto": str(self.proto_path.relative_to(ROOT)),
                "device_kind": self.field("device_description_str"),
                "memory_bytes": self.memory_bytes,
                "memory_bandwidth_Bps": int(self.field("memory_bandwidth")),
                "core_count": int(self.field("core_count")),
                "compute_capability": self.field("major") + (
                    ".0a" if "ACCELERATED_FEATURES" in self.config_text else ".0")}


def targets(which: str) -> list[Target]:
    names = ("h200", "h100") if which == "both" else (which,)
    return [Target(n, TARGETS_DIR / f"{n}.txtpb") for n in names]


# -- one program: compile it and look inside ----------------------------------------------------

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


# -- the memory plan: what the engine would allocate on the card -------------------------------

@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per device: the client's memory limit, the weights, the KV pool the engine would size
    (kv_cache_fraction of what the weights leave), and what is left for a step's temporaries."""

    limit_bytes: int
    weight_bytes: int
    kv_pages: int
    kv_bytes: int

    @property
    def headroom_bytes(self) -> int:
        return self.limit_bytes - self.weight_bytes - self.kv_bytes


def param_bytes(params) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))


def memory_plan(target: Target, model: LoadedModel, engine: EngineConfig, dtype,
                max_model_len: int, tp: int) -> MemoryPlan:
    """As Engine sizes its pool (engine_config.pool_pages) on a device with JAX's default
    memory fraction, after the weights (split over tp devices) are in."""
    limit = int(target.memory_bytes * CLIENT_MEM_FRACTION)
    weights = param_bytes(model.params) // tp
    budget = int((limit - weights) * engine.kv_cache_fraction)
    config = dataclasses.replace(engine, kv_cache_bytes=budget, tensor_parallel=tp)
    pages = pool_pages(model, config, dtype, max_model_len)
    return MemoryPlan(limit, weights, pages, pages * page_bytes(model, config, dtype) // tp)


def check_plan(row: dict[str, Any], plan: MemoryPlan) -> None:
    """within_plan: the program's buffers (arguments + outputs not aliased to an argument +
    temporaries) fit the device's limit."""
    mem = row.get("memory")
    if not mem:
        return
    peak = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    row["peak_bytes"] = peak
    row["within_plan"] = peak <= plan.limit_bytes and mem["temp"] <= plan.headroom_bytes


# -- the engine's programs ----------------------------------------------------------------------

def abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


@dataclasses.dataclass(frozen=True)
class Setup:
    """The engine's programs for one target and tensor-parallel degree, abstract."""

    model: Any                # the Llama module (attention "pallas", interpret from devices)
    params: Any               # ShapeDtypeStructs on the devices
    kv: KVCache               # ShapeDtypeStructs on the devices
    param_shardings: Any
    incoming_sharding: Any
    devices: tuple


def setup(config: ModelConfig, loaded: LoadedModel, dtype, devices: list, num_pages: int,
          page_size: int) -> Setup:
    tp = len(devices)
    params = runtime_params(loaded.params, devices[0].platform)   # the layout the runner uses
    shape = (config.num_layers, num_pages, page_size, config.num_kv_heads, config.head_dim)
    interpret = kernel_interpret(devices)
    host_kind = host_memory_kind(devices[0])
    if tp == 1:
        mesh, sharding = None, SingleDeviceSharding(devices[0])
        param_sh = jax.tree.map(lambda _: sharding, params)
        kv_sh = sharding
        incoming = SingleDeviceSharding(devices[0], memory_kind=host_kind)
    else:
        mesh = parallel.make_mesh(tp, devices)
        param_sh = parallel.param_shardings(params, mesh)
        kv_sh = parallel.kv_sharding(mesh)
        incoming = kv_sh.with_memory_kind(host_kind) if host_kind else kv_sh
    pool = jax.ShapeDtypeStruct(shape, dtype, sharding=kv_sh)
    model = Llama(config, dtype, "pallas", mesh, interpret=interpret)
    return Setup(model, abstract(params, param_sh), KVCache(pool, pool),
                 None if mesh is None else param_sh, incoming, tuple(devices))


def engine_programs(target: Target, tp: int, ptxas: str | None, log,
                    model: str = MODEL) -> tuple[list, dict]:
    """Every step and page program of the default engine configuration (layered loads on) for
    a random: preset of a real shape (its sliding window, biases, q/k norm included)."""
    config, dtype = PRESETS[model.removeprefix("random:")], jnp.dtype(DTYPE)
    loaded = LoadedModel(config, param_shapes(config, dtype), None, model)
    engine = EngineConfig(attention="pallas", swap_in="layered", host_cache_bytes=1,
                          tensor_parallel=tp)
    programs = program_set(config, engine)
    max_model_len = programs.pages_per_seq * engine.page_size
    plan = memory_plan(target, loaded, engine, dtype, max_model_len, tp)
    devices = target.devices(tp)
    s = setup(config, loaded, dtype, devices, plan.kv_pages, engine.page_size)
    suffix = "" if tp == 1 else f"_tp{tp}"
    rows = []
    steps = {False: jit_step(s.model, s.param_shardings),
             True: jit_step(s.model, s.param_shardings,
                            None if tp == 1 else s.incoming_sharding)}
    for shape in programs.shapes:
        name = (f"step{suffix} T={shape.tokens} S={shape.seqs} P={shape.pages_per_seq}"
                + (f" incoming={shape.incoming_pages}" if shape.incoming_pages else ""))
        step = steps[bool(shape.incoming_pages)]
        row = compile_program(
            name, f"step{suffix}", target,
            lambda step=step, shape=shape: lower_step(step, s.params, s.kv, shape,
                                                      s.incoming_sharding),
            needs_triton=True, ptxas=ptxas, shape=dataclasses.asdict(shape), tp=tp,
            interpret=s.model.interpret)
        check_plan(row, plan)
        rows.append(log(row))
    pages = jit_page_programs(s.model.mesh)
    for name, fn in pages.items():
        args = page_program_args(name, s.kv)
        row = compile_program(f"page{suffix} {name} x{PAGE_CHUNK}", f"page{suffix}", target,
                              lambda fn=fn, args=args: fn.lower(s.kv, *args),
                              needs_triton=False, ptxas=ptxas, tp=tp)
        check_plan(row, plan)
        rows.append(log(row))
    host_kind = host_memory_kind(devices[0])
    meta = {"tp": tp, "model": model, "dtype": DTYPE, "attention": "pallas",
            "interpret": s.model.interpret, "devices": [str(d) for d in devices],
            "program_set": {"token_buckets": list(programs.token_buckets),
                            "max_num_seqs": programs.max_num_seqs,
                            "pages_per_seq": programs.pages_per_seq,
                            "incoming_pages": programs.incoming_pages,
                            "page_size": engine.page_size},
            "plan": {**dataclasses.asdict(plan), "headroom_bytes": plan.headroom_bytes,
                     "client_mem_fraction": CLIENT_MEM_FRACTION,
                     "kv_cache_fraction": engine.kv_cache_fraction},
            "layered_incoming_memory_kind": host_kind,
            "layered_note": None if host_kind else (
                "the compile-only device reports no memory kinds, so the layered-load "
                "programs stage their incoming pages in device memory (the runner's "
                "pinned_host sharding is dropped): on a GPU they compile with pinned_host")}
    return rows, meta


# -- the kernel sweep ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KernelCase:
    page_size: int
    heads: int
    kv_heads: int
    head_dim: int
    mix: str                  # "decode", "mixed", "prefill"
    dtype: str
    tokens: int
    seqs: int
    precision: str = "default"   # jax.default_matmul_precision while tracing: float32 dots
                                 # run TF32 by default, IEEE fp32 with "highest" (what the
                                 # runner sets for float32 programs)
    max_model_len: int = 4096
    num_pages: int = 2048
    sliding_window: int | None = None    # Mistral-style: keys older than this are not read

    @property
    def name(self) -> str:
        kind = self.dtype + ("" if self.precision == "default" else f"/{self.precision}")
        window = "" if self.sliding_window is None else f" window={self.sliding_window}"
        return (f"kernel p{self.page_size} h{self.heads}/{self.kv_heads} d{self.head_dim} "
                f"{self.mix} T={self.tokens} S={self.seqs} {kind}{window}")


MIXES = {"decode": (64, 64), "mixed": (256, 64), "prefill": (512, 4)}
HEAD_LAYOUTS = ((32, 8, 128), (8, 8, 64), (16, 4, 128), (64, 8, 128))
SWEEPS = ("full", "ci", "smoke")


def kernel_cases(sweep: str = "full") -> list[KernelCase]:
    """full: page sizes 16/32/64 x head layouts x token mixes x bf16 / f32 (TF32), and f32 with
    precision highest at page size 16; ci: page size 16, three layouts, bf16 / f32; smoke: one
    small config."""
    if sweep == "smoke":
        return [KernelCase(16, 8, 2, 64, "mixed", "bfloat16", 32, 4, max_model_len=256,
                           num_pages=64)]
    pages, layouts = ((16,), HEAD_LAYOUTS[:3]) if sweep == "ci" else ((16, 32, 64), HEAD_LAYOUTS)
    cases = [KernelCase(p, h, kvh, d, mix, dt, *MIXES[mix])
             for p in pages for h, kvh, d in layouts for mix in MIXES
             for dt in ("bfloat16", "float32")]
    if sweep == "full":
        cases += [KernelCase(16, h, kvh, d, mix, "float32", *MIXES[mix], precision="highest")
                  for h, kvh, d in layouts for mix in MIXES]
    if sweep in ("full", "ci"):     # the sliding window (Mistral 7B v0.1: 4096; a small one)
        cases += [KernelCase(16, 32, 8, 128, mix, "bfloat16", *MIXES[mix], sliding_window=w,
                             max_model_len=8192, num_pages=4096)
                  for w in (4096, 64) for mix in MIXES]
    return cases


def lower_kernel(case: KernelCase, device):
    """The kernel alone on one layer of a pool (interpret from the device's platform)."""
    from pallas_kernels import ragged_paged_attention_stacked
    sharding = SingleDeviceSharding(device)
    dt = jnp.dtype(case.dtype)
    spec = lambda shape, d: jax.ShapeDtypeStruct(shape, d, sharding=sharding)  # noqa: E731
    pages_per_seq = -(-case.max_model_len // case.page_size)
    pool = spec((2, case.num_pages, case.page_size, case.kv_heads, case.head_dim), dt)
    args = (spec((case.tokens, case.heads, case.head_dim), dt), pool, pool,
            spec((), jnp.int32), spec((case.seqs, pages_per_seq), jnp.int32),
            spec((case.seqs,), jnp.int32), spec((case.seqs + 1,), jnp.int32))
    interpret = kernel_interpret([device])
    fn = jax.jit(lambda *a: ragged_paged_attention_stacked(
        *a, interpret=interpret, sliding_window=case.sliding_window))
    with jax.default_matmul_precision(case.precision):
        return fn.lower(*args)


def kernel_programs(target: Target, ptxas: str | None, log, sweep: str) -> list:
    device = target.devices(1)[0]
    rows = []
    for case in kernel_cases(sweep):
        rows.append(log(compile_program(case.name, "kernel", target,
                                        lambda case=case: lower_kernel(case, device),
                                        needs_triton=True, ptxas=ptxas,
                                        case=dataclasses.asdict(case),
                                        interpret=kernel_interpret([device]))))
    return rows


# -- report -------------------------------------------------------------------------------------

def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per group: programs, compiled, Triton where needed, spills, registers, memory, seconds."""
    out = {}
    for group in dict.fromkeys(r["group"] for r in rows):
        rs = [r for r in rows if r["group"] == group]
        ok = [r for r in rs if r["ok"]]
        pallas = [k for r in ok for k in r.get("pallas_kernels", [])]
        out[group] = {
            "programs": len(rs), "compiled": len(ok),
            "triton_missing": sum(1 for r in rs if r["needs_triton"] and not r.get("triton")),
            "spill_bytes": sum(r.get("spill_bytes", 0) for r in ok),
            "spilling_programs": sum(1 for r in ok if r.get("spill_bytes")),
            "retried_with_options": sum(1 for r in ok if "compile_options" in r),
            "triton_registers_max": max((r.get("max_registers", 0) for r in ok), default=None),
            "pallas_registers_max": max((k["registers"] for k in pallas), default=None),
            "pallas_registers_min": min((k["registers"] for k in pallas), default=None),
            "max_temp_bytes": max((r["memory"]["temp"] for r in ok if r.get("memory")),
                                  default=None),
            "within_plan": (all(r["within_plan"] for r in ok if "within_plan" in r)
                            if any("within_plan" in r for r in ok) else None),
            "compile_s": round(sum(r.get("compile_s", 0) for r in rs), 1),
            "max_compile_s": max((r.get("compile_s", 0) for r in rs), default=0)}
    return out


def print_table(target: str, summary: dict[str, dict]) -> None:
    gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
    print(f"\n{target}: {'group':10s} {'compiled':>10s} {'no triton':>9s} {'spilling':>8s} "
          f"{'regs(pallas)':>12s} {'temp GiB':>8s} {'in plan':>7s} {'compile s':>9s}")
    for group, s in summary.items():
        regs = ("-" if s["pallas_registers_max"] is None
                else f"{s['pallas_registers_min']}-{s['pallas_registers_max']}")
        print(f"{'':{len(target) + 1}s} {group:10s} {s['compiled']:>4d}/{s['programs']:<5d} "
              f"{s['triton_missing']:>9d} {s['spilling_programs']:>8d} {regs:>12s} "
              f"{gib(s['max_temp_bytes']):>8s} {str(s['within_plan']):>7s} "
              f"{s['compile_s']:>9.1f}")


def log_row(row: dict) -> dict:
    status = "ok" if row["ok"] else "FAILED"
    extra = ""
    if row["ok"]:
        regs = [k["registers"] for k in row.get("pallas_kernels", [])]
        extra = (f"triton={row['triton_calls']} spills={row.get('spill_bytes')} "
                 f"regs={regs} temp={row['memory']['temp'] if row.get('memory') else '-'} "
                 f"{row.get('compile_s')} s"
                 + (f" (with {row['compile_options']})" if "compile_options" in row else ""))
    else:
        extra = row["error"].splitlines()[0][:300]
    print(f"  [{row['target']}] {row['name']}: {status} {extra}", flush=True)
    return row


def source_hash() -> str:
    """sha256 of the sources the programs come from (pensieve_jax, pallas_kernels): which
    working tree a result belongs to, where git_commit only says "modified". Taken once, at
    start (SOURCE_HASH), as the modules were imported."""
    h = hashlib.sha256()
    for package in ("pensieve_jax", "pallas_kernels"):
        for path in sorted((ROOT / package).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    return h.hexdigest()[:16]


SOURCE_HASH = source_hash()


def run_target(target: Target, args, ptxas: str | None) -> dict:
    print(f"{target.name}: {target.field('device_description_str')} "
          f"({target.proto_path.name})", flush=True)
    result: dict[str, Any] = {"target": target.describe(), "source_sha256": SOURCE_HASH,
                              "ptxas": ptxas,
                              "ptxas_options": list(PTXAS_OPTIONS), "engine": []}
    rows: list[dict] = []
    start = time.perf_counter()
    if not args.kernels_only and not args.smoke:
        for tp in args.tp:
            try:
                tp_rows, meta = engine_programs(target, tp, ptxas, log_row,
                                                getattr(args, "model", MODEL))
            except Exception as e:  # noqa: BLE001 - a setup that fails is recorded, not fatal
                meta = {"tp": tp, "error": f"{type(e).__name__}: {e}"[:4000],
                        "traceback": traceback.format_exc()[-3000:]}
                tp_rows = []
                print(f"  [{target.name}] tp={tp} setup FAILED: {meta['error']}", flush=True)
            result["engine"].append(meta)
            rows += tp_rows
    rows += kernel_programs(target, ptxas, log_row, "smoke" if args.smoke else args.sweep)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["summary"] = summarize(rows)
    result["all_ok"] = all(r["ok"] for r in rows) and not any(
        "error" in m for m in result["engine"])
    result["programs"] = rows
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                    help="folder for aot_<target>.json (aot_<target>_kernels.json with "
                         "--kernels-only, aot_<target>_smoke.json with --smoke)")
    ap.add_argument("--target", default="both", choices=["h200", "h100", "both"])
    ap.add_argument("--kernels-only", action="store_true", help="the Pallas kernel sweep only")
    ap.add_argument("--smoke", action="store_true", help="one small kernel config (the test)")
    ap.add_argument("--sweep", default="full", choices=SWEEPS[:2],
                    help="the kernel sweep (ci: a subset)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2],
                    help="tensor-parallel degrees of the engine programs")
    ap.add_argument("--model", default=MODEL,
                    help="a random: preset of the engine programs, e.g. random:qwen3-8b or "
                         "random:mistral-7b-v0.1 (results: aot_<target>_<preset>.json)")
    args = ap.parse_args(argv)
    if not plugin_installed():
        print("the CUDA plugin is not installed (make aot installs it into .venv/aot)",
              file=sys.stderr)
        return 2
    ptxas = find_ptxas()
    suffix = "_smoke" if args.smoke else "_kernels" if args.kernels_only else ""
    if args.model != MODEL and not (args.smoke or args.kernels_only):
        suffix = "_" + args.model.removeprefix("random:").replace(".", "_")
    failed = False
    for target in targets(args.target):
        result = {**environment(argv, __file__), **run_target(target, args, ptxas)}
        print_table(target.name, result["summary"])
        write_json(Path(args.out) / f"aot_{target.name}{suffix}.json", result)
        failed |= not result["all_ok"]
    return 1 if failed else 0


def plugin_installed() -> bool:
    """Whether JAX can discover a CUDA PJRT plugin (jax_plugins.xla_cuda13 or _cuda12)."""
    import importlib.util
    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (13, 12))
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
