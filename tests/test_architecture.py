"""The house's rules, read off the source (issue 19): imports point one way along the layers, no
import cycles, small modules and classes, no private attribute of another module touched; the
benchmark scripts and their parts (benchmarks/) are held to the module size.

What breaks a rule is listed below with its reason, exactly: a listed item that no longer
breaks it fails the test too, so the lists only shrink. Imports under `if TYPE_CHECKING:` are
annotations, never run: they do not count."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cpu_kernels", "pallas_kernels", "pensieve_jax", "serving")
BENCHMARKS = ("benchmarks",)    # scripts and their parts: held to the module size only
MAX_MODULE_LINES = 300
MAX_CLASS_LINES = 200

# Layers, lowest first: a module may import its own layer and those below it, never above.
LAYERS = (
    ("cpu_kernels", "pallas_kernels"),
    ("pensieve_jax.model",),
    ("pensieve_jax.tokenizer", "pensieve_jax.weights"),
    ("pensieve_jax.runner",),
    ("pensieve_jax.kvcache",),
    ("pensieve_jax.engine",),
    ("pensieve_jax.session", "pensieve_jax.demo", "pensieve_jax"),
    ("serving",),
)

# -- what does not follow the rules, and why --------------------------------------------------
LONG_MODULES: set[str] = set()
LONG_BENCHMARK_MODULES: set[str] = set()
LONG_CLASSES: set[str] = set()
CYCLES: set[frozenset[str]] = set()
UPWARD_IMPORTS: set[tuple[str, str]] = {
    # Engine.session(): the Session API's convenience factory (imported when called)
    ("pensieve_jax.engine.engine", "pensieve_jax.session"),
    # the converted-model cache shares the compilation cache's directory switch (ENV, OFF)
    ("pensieve_jax.weights", "pensieve_jax.runner.compile_cache"),
}


def modules(packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    found = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_pb2" in path.name or "pensieve/v1" in path.as_posix():
                continue            # generated gRPC stubs
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (at any depth of the file, functions included)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                 for n in ast.walk(block)}     # annotations only: never imported at run time
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            subs = [f"{base}.{a.name}" for a in node.names]
            targets = [s for s in subs if s in known] or [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def layer(name: str) -> int:
    best, rank = -1, -1
    for i, members in enumerate(LAYERS):
        for m in members:
            if (name == m or name.startswith(m + ".")) and len(m) > best:
                best, rank = len(m), i
    return rank


def graph() -> dict[str, set[str]]:
    known = modules()
    return {n: imports(n, p, known) for n, p in known.items()}


def cycles(g: dict[str, set[str]]) -> set[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), set(), [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.add(frozenset(comp))
    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_beyond_the_known_ones():
    assert cycles(graph()) == CYCLES


def test_imports_point_down_the_layers():
    g = graph()
    # a package's __init__ may import its own modules; pensieve_jax's exports the public API
    upward = {(a, b) for a, targets in g.items() for b in targets
              if layer(b) > layer(a) and a != "pensieve_jax"}
    assert upward == UPWARD_IMPORTS


def test_every_module_is_in_a_layer():
    assert [n for n in modules() if layer(n) < 0] == []


def test_modules_and_classes_are_small():
    long_modules, long_classes = set(), set()
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.add(name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long_classes.add(f"{name}.{node.name}")
    assert long_modules == LONG_MODULES
    assert long_classes == LONG_CLASSES


def test_benchmark_modules_are_small():
    long_modules = {name for name, path in modules(BENCHMARKS).items()
                    if len(path.read_text().splitlines()) > MAX_MODULE_LINES}
    assert long_modules == LONG_BENCHMARK_MODULES


NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}


def test_no_private_name_of_another_object_or_module():
    """`obj._name` only on self / cls (NamedTuple's _replace & co. are public), and no
    `from project.module import _name`."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.attr not in NAMEDTUPLE_API
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                found.append(f"{name}:{node.lineno} {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                found += [f"{name}:{node.lineno} import {a.name}" for a in node.names
                          if a.name.startswith("_")]
    assert found == []
