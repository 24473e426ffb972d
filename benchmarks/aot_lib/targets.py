"""The GPUs aot_compile.py compiles for: each a GpuTargetConfig text proto under
benchmarks/gpu_targets/, whose compile-only devices come from
jax.experimental.topologies.get_topology_desc.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TARGETS_DIR = ROOT / "benchmarks" / "gpu_targets"


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
