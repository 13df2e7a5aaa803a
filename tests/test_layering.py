"""Imports flow one way, in the order of the data (docs/architecture.md): no package of Kiln imports a
later stage, at the top of a module or inside a function (so no circle between packages either),
no two files import each other around a loop, and only ``kiln.distributed`` touches
``torch.distributed``.

The checks read every module's ``import`` statements with ``ast`` (so a lazy import inside a
function counts as much as one at the top), and one interpreter imports the packages in order and
looks at what each import loaded (so an import made any other way is caught too).
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import kiln

SRC = Path(kiln.__file__).parent

# The stages in the order the data flows through them; a package may import only those before it.
# kiln.ngrams (shared n-gram hashing, numpy only) sits under every stage that hashes text: the data
# stages (dedup) and evaluation (contamination) both use it. kiln.demo runs the whole pipeline
# (data -> tokenizer -> train -> eval -> generate), so it sits above every stage, below the CLI that
# calls it. align, serve and scaling are placed before they are written.
ORDER = (
    "artifacts", "ngrams", "kernels", "distributed", "tokenizer", "model", "data", "shards",
    "generate", "train", "eval", "align", "serve", "scaling", "bench", "demo", "cli",
)

# Imports that go against the order on purpose, each with its reason: (module, imported stage) -> why.
ALLOWED: dict[tuple[str, str], str] = {
    ("kiln.distributed", "shards"): "the public name kiln.distributed.DistributedWindowSampler, kept as a "
    "PEP 562 alias of kiln.shards.sampler's (loaded only when used; importing kiln.distributed loads no shards)",
}

# Edges of the data flow that ORDER alone allows but that must go, each with its reason; a known
# offender stays listed until its fix lands (then its entry must be removed: see the test).
FORBIDDEN = {("data", "model"): "data curation builds no model: a scorer is passed in (issue 17 item 3)"}
KNOWN: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    me = _module_name(path).split(".")
    package = me if path.name == "__init__.py" else me[:-1]
    out = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # `from kiln import train` imports kiln.train
            names = [f"{base}.{a.name}" for a in node.names] if base == "kiln" else [base]
            out += [(node.lineno, n) for n in names]
    return out


def _stage(module: str) -> str | None:
    """The stage of a kiln module (kiln.train.loss -> train); None for kiln itself and non-kiln names."""
    parts = module.split(".")
    if parts[0] != "kiln" or len(parts) < 2 or parts[1] == "__version__":
        return None
    return "cli" if parts[1] == "__main__" else parts[1]  # `python -m kiln` is the command line


def _edges() -> list[tuple[str, int, str, str, str]]:
    """(file, line, module, imported kiln module, its stage) for every cross-stage import."""
    edges = []
    for path in sorted(SRC.rglob("*.py")):
        me = _module_name(path)
        for line, name in _imports(path):
            mine, theirs = _stage(me), _stage(name)
            if theirs is not None and theirs != mine:
                edges.append((str(path.relative_to(SRC.parent)), line, me, name, theirs))
    return edges


def test_every_stage_is_placed():
    stages = {_stage(_module_name(p)) for p in SRC.rglob("*.py")} - {None}
    missing = stages - set(ORDER)
    assert not missing, f"place {sorted(missing)} in ORDER (tests/test_layering.py) and docs/architecture.md"


def test_no_import_of_a_later_stage():
    bad, used = [], set()
    for file, line, me, name, theirs in _edges():
        mine = _stage(me)
        if mine is None or ORDER.index(theirs) < ORDER.index(mine):
            continue
        if (me, theirs) in ALLOWED:
            used.add((me, theirs))
        else:
            bad.append(f"{file}:{line} imports {name} ({mine} comes before {theirs})")
    assert not bad, "imports of a later stage:\n" + "\n".join(bad)
    stale = sorted(set(ALLOWED) - used)
    assert not stale, f"{stale} import no later stage any more: remove them from ALLOWED"


def test_no_forbidden_edge():
    found, bad = set(), []
    for file, line, me, name, theirs in _edges():
        key = (_stage(me), theirs)
        if key not in FORBIDDEN:
            continue
        known = (me, f"kiln.{theirs}")
        if known in KNOWN:
            found.add(known)
        else:
            bad.append(f"{file}:{line} imports {name}: {FORBIDDEN[key]}")
    assert not bad, "\n".join(bad)
    stale = set(KNOWN) - found
    assert not stale, f"{sorted(stale)} no longer import what KNOWN lists: remove them from KNOWN, the check is strict now"


# File-level import circles that exist on purpose or await their fix, each named: frozenset of modules -> why.
KNOWN_CIRCLES: dict[frozenset[str], str] = {}


def _module_graph() -> dict[str, set[str]]:
    """module -> the kiln modules it imports (a package's __init__ only when nothing more precise is
    named: `from kiln.x import y` counts kiln.x.y when y is a module, else kiln.x)."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for me, path in modules.items():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[me] |= {t for t in targets if t in modules and t != me}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan), ignoring package faces: an
    edge into an ``__init__`` that only re-exports is how a package hands names on, not a circle."""
    faces = {m for m in graph if (SRC.parent / m.replace(".", "/") / "__init__.py").is_file()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v] - faces:
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
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index and v not in faces:
            visit(v)
    return out


def test_no_import_circle_between_files():
    """No two modules import each other, directly or around a loop (lazy imports count too)."""
    found = _circles(_module_graph())
    new = [sorted(c) for c in found if c not in KNOWN_CIRCLES]
    assert not new, f"import circles: {new}"
    stale = [sorted(c) for c in KNOWN_CIRCLES if c not in found]
    assert not stale, f"{stale} is no longer a circle: remove it from KNOWN_CIRCLES, the check is strict now"


def test_only_kiln_distributed_touches_torch_distributed():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        if _stage(_module_name(path)) == "distributed":
            continue
        bad += [f"{path.relative_to(SRC.parent)}:{line} imports {name}" for line, name in _imports(path)
                if name == "torch.distributed" or name.startswith("torch.distributed.")]
        # `import torch` then `torch.distributed.all_reduce(...)` reaches it as an attribute
        bad += [f"{path.relative_to(SRC.parent)}:{n.lineno} uses torch.distributed" for n in ast.walk(_tree(path))
                if isinstance(n, ast.Attribute) and n.attr == "distributed"
                and isinstance(n.value, ast.Name) and n.value.id == "torch"]
    assert not bad, "only kiln.distributed may use torch.distributed:\n" + "\n".join(bad)


def test_importing_each_stage_loads_no_later_stage():
    """One fresh interpreter imports the stages in order; after each, no later stage may be loaded."""
    code = (
        "import importlib, json, sys\n"
        f"order = {list(ORDER)!r}\n"
        "out = {}\n"
        "for i, s in enumerate(order):\n"
        "    try:\n"
        "        importlib.import_module('kiln.' + s)\n"
        "    except ModuleNotFoundError as e:\n"
        "        if e.name == 'kiln.' + s: continue\n"  # a stage not written yet
        "        raise\n"
        "    later = sorted({m.split('.')[1] for m in sys.modules if m.startswith('kiln.')} & set(order[i + 1:]))\n"
        "    if later: out[s] = later\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {}
