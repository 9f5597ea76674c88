"""The map of the house: which part of lmforge may import which.

Every module under src/lmforge is read with `ast` (no code runs): every import counts, at the top of a file,
inside a function, under `if TYPE_CHECKING:`, relative or absolute, and `importlib.import_module("lmforge...")`
with a literal name. Three kinds of rule:

  a. direction   a package imports only what its row of ALLOWED below lists, itself and the core; only the front
                 door imports stages/ and serve/; only the front door uses `lmforge.load`, the one loader, or
                 anything else from the package root (dunders such as `__version__` are fine everywhere);
  b. cycles      no cycle between packages (front-door modules left out of their package) and none between
                 modules;
  c. privacy     no module imports another module's underscore name (`from lmforge.x import _y`).

ALLOWED is the rule. Changing the layering means changing that table, here, on purpose.

Building the graph from source (`build_graph`) and checking a graph (`check`) are separate, so the checker is
tested on small made-up graphs too (the `test_checker_*` tests).
"""
from __future__ import annotations

import ast
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import pytest

# ---------------------------------------------------------------------------------------------------------------
# The rule. Package -> the packages it may import, besides itself and the core.
# ---------------------------------------------------------------------------------------------------------------
ALLOWED: dict[str, set[str]] = {
    "core":      set(),
    "data":      {"tokenizer", "model", "quant"},
    "tokenizer": {"data", "model", "quant"},
    "model":     {"data", "tokenizer", "quant"},
    "quant":     {"data", "tokenizer", "model"},
    "train":     {"data", "tokenizer", "model", "quant"},
    "infer":     {"data", "tokenizer", "model", "quant"},
    "eval":      {"data", "tokenizer", "model", "quant", "infer", "baselines", "interop"},
    "baselines": {"data", "tokenizer", "model", "quant", "infer", "eval", "interop"},
    "interop":   {"data", "tokenizer", "model", "quant", "infer", "eval", "baselines"},
    "stages":    {"data", "tokenizer", "model", "quant", "train", "infer", "eval", "baselines", "interop"},
    "rag":       {"data", "tokenizer", "model", "quant", "infer", "eval", "interop"},
    "serve":     {"data", "tokenizer", "model", "quant", "infer", "eval", "interop", "rag"},
}
# The core: top-level modules lmforge/<name>.py at the bottom of the house. They import only each other.
CORE = {"errors", "config", "io", "runtime", "checkpoint", "verbs", "version"}
# The front door may import anything: the package root (lmforge/__init__.py, which defines lmforge.load), these
# top-level modules, and every lmforge/<package>/cli.py (verb handlers).
FRONT_DOOR_TOP = {"cli", "__main__", "quickstart"}
# Packages that nothing but the front door imports.
FRONT_DOOR_ONLY = {"stages", "serve"}

FRONT_DOOR = "front door"
ROOT = "lmforge"

# rule names, as they appear in failure messages
DIRECTION = "direction"
FRONT_ONLY = "only the front door imports stages/serve"
ROOT_LOAD = "lmforge.load belongs to the front door"
ROOT_NAME = "only the front door imports the front door"
UNKNOWN = "package not in ALLOWED"
PRIVATE = "underscore name of another module"
PACKAGE_CYCLE = "package cycle"
MODULE_CYCLE = "module cycle"

SRC = Path(__file__).resolve().parents[1] / "src"


# ---------------------------------------------------------------------------------------------------------------
# Graph building: source files -> {module: [imported]}.
# An imported entry is a module ("lmforge.infer.engine") or a name taken from a module ("lmforge.infer.engine:Engine").
# ---------------------------------------------------------------------------------------------------------------
def is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__") and len(name) > 4


def is_private(name: str) -> bool:
    return name.startswith("_") and not is_dunder(name)


def module_files(src: Path) -> dict[str, Path]:
    """{dotted module name: file} for every .py file under src/lmforge."""
    out = {}
    for path in sorted((src / ROOT).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _attribute_chain(node: ast.Attribute) -> tuple[str, list[str]] | None:
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return node.id, attrs[::-1]


def imports_of(module: str, source: str, modules: set[str], is_package: bool = False,
               filename: str = "<src>") -> list[str]:
    """What one module imports from lmforge, as graph entries (sorted, no duplicates)."""
    tree = ast.parse(source, filename)
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    bound: dict[str, str] = {}  # local name -> the lmforge module bound to it (for attribute use: lmforge.load)

    def add(mod: str, name: str | None = None):
        if name is None:
            if mod != ROOT:
                found.add(mod)
        elif not (mod == ROOT and is_dunder(name)):  # `from lmforge import __version__` is fine everywhere
            found.add(f"{mod}:{name}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name != ROOT and not a.name.startswith(ROOT + "."):
                    continue
                add(a.name)
                if a.asname:
                    bound[a.asname] = a.name
                else:
                    bound[ROOT] = ROOT  # `import lmforge.x.y` binds `lmforge`
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = package.split(".")
                if node.level - 1 >= len(up):
                    raise ValueError(f"{module}: relative import beyond the top package")
                base = ".".join(up[: len(up) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base != ROOT and not base.startswith(ROOT + "."):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if a.name == "*":
                    add(base)
                elif sub in modules:  # `from lmforge import checkpoint` imports lmforge.checkpoint
                    add(sub)
                    bound[a.asname or a.name] = sub
                else:
                    add(base, a.name)
        elif isinstance(node, ast.Call):  # importlib.import_module("lmforge.x") / __import__("lmforge.x")
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if (fname in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                    and (node.args[0].value == ROOT or node.args[0].value.startswith(ROOT + "."))):
                add(node.args[0].value)

    # names used through a bound module: `import lmforge` ... `lmforge.load(...)`, `ckpt._private`
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        chain = _attribute_chain(node)
        if chain is None or chain[0] not in bound:
            continue
        mod, name = bound[chain[0]], None
        for attr in chain[1]:
            if f"{mod}.{attr}" in modules:
                mod = f"{mod}.{attr}"
            else:
                name = attr
                break
        add(mod, name)
    return sorted(found)


def build_graph(src: Path = SRC) -> dict[str, list[str]]:
    """{module: [imported entries]} for every module under src/lmforge."""
    files = module_files(src)
    names = set(files)
    return {m: imports_of(m, p.read_text(encoding="utf-8"), names, p.name == "__init__.py", str(p))
            for m, p in files.items()}


# ---------------------------------------------------------------------------------------------------------------
# Rule checking: graph -> violations. Knows nothing about files.
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Violation:
    rule: str
    module: str
    imported: str
    detail: str = ""

    def __str__(self):
        return f"  [{self.rule}] {self.module} -> {self.imported}" + (f"   ({self.detail})" if self.detail else "")


def package_of(module: str) -> str:
    """'core', a package name, FRONT_DOOR, or the unknown top-level name."""
    parts = module.split(".")
    assert parts[0] == ROOT, module
    if len(parts) == 1:
        return FRONT_DOOR  # the package root
    if len(parts) == 2 and parts[1] in FRONT_DOOR_TOP:
        return FRONT_DOOR
    if len(parts) == 3 and parts[2] == "cli":
        return FRONT_DOOR  # lmforge/<package>/cli.py
    if parts[1] in CORE:
        return "core"
    return parts[1]


def _split(entry: str) -> tuple[str, str | None]:
    mod, _, name = entry.partition(":")
    return mod, name or None


def check_imports(graph: dict[str, list[str]]) -> list[Violation]:
    """Rules a (direction, stages/serve, the root) and c (underscore names)."""
    out = []
    for src, entries in graph.items():
        sp = package_of(src)
        if sp != FRONT_DOOR and sp not in ALLOWED:
            out.append(Violation(UNKNOWN, src, src, f"'{sp}' has no row in ALLOWED"))
        for entry in entries:
            mod, name = _split(entry)
            if mod == ROOT and name is not None and is_dunder(name):
                continue
            # c. another module's underscore name, or a private module from outside its package
            if name is not None and is_private(name) and mod != src:
                out.append(Violation(PRIVATE, src, entry, f"'{name}' is private to {mod}"))
            last = mod.rpartition(".")
            if is_private(last[2]) and not (src == last[0] or src.startswith(last[0] + ".")):
                out.append(Violation(PRIVATE, src, entry, f"module '{last[2]}' is private to {last[0]}"))
            if sp == FRONT_DOOR:
                continue  # the front door may import anything
            tp = package_of(mod)
            if tp == FRONT_DOOR:
                if mod == ROOT and name == "load":
                    out.append(Violation(ROOT_LOAD, src, entry, "the one loader is for the front door; "
                                         "take the model as an argument"))
                else:
                    out.append(Violation(ROOT_NAME, src, entry, f"{mod} is the front door"))
                continue
            if tp in FRONT_DOOR_ONLY and tp != sp:
                out.append(Violation(FRONT_ONLY, src, entry, f"{sp} imports {tp}"))
            if tp == sp or tp == "core":
                continue
            if tp not in ALLOWED:
                out.append(Violation(UNKNOWN, src, entry, f"'{tp}' has no row in ALLOWED"))
            elif sp in ALLOWED and tp not in ALLOWED[sp]:
                out.append(Violation(DIRECTION, src, entry, f"{sp} may not import {tp}"))
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per strongly connected component with more than one node, as [a, b, ..., a]."""
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})
    index, low, on_stack, stack, comps = {}, {}, set(), [], []
    counter = [0]

    def strongconnect(v):  # Tarjan; the graphs are small enough for recursion
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            comps.append(comp)

    for v in nodes:
        if v not in index:
            strongconnect(v)
    cycles = []
    for comp in comps:
        if len(comp) < 2:
            continue
        start = min(comp)
        prev, queue = {start: None}, deque([start])
        while queue:  # BFS inside the component, back to start
            v = queue.popleft()
            for w in sorted(edges.get(v, ())):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    cycles.append(path[::-1] + [start])
                    queue.clear()
                    break
                if w in comp and w not in prev:
                    prev[w] = v
                    queue.append(w)
    return sorted(cycles)


def check_cycles(graph: dict[str, list[str]]) -> list[Violation]:
    """Rule b: cycles between packages (front door left out) and between modules."""
    out = []
    mod_edges: dict[str, set[str]] = defaultdict(set)
    pkg_edges: dict[str, set[str]] = defaultdict(set)
    witness: dict[tuple[str, str], str] = {}
    for src, entries in graph.items():
        for entry in entries:
            mod, name = _split(entry)
            if mod == ROOT and name is not None and is_dunder(name):
                continue
            if mod != src:
                mod_edges[src].add(mod)
            sp, tp = package_of(src), package_of(mod)
            if FRONT_DOOR in (sp, tp) or sp == tp:
                continue
            pkg_edges[sp].add(tp)
            witness.setdefault((sp, tp), f"{src} imports {mod}")
    for cyc in _cycles(pkg_edges):
        why = "; ".join(f"{a}->{b}: {witness[a, b]}" for a, b in zip(cyc, cyc[1:]))
        out.append(Violation(PACKAGE_CYCLE, cyc[0], " -> ".join(cyc), why))
    for cyc in _cycles(mod_edges):
        out.append(Violation(MODULE_CYCLE, cyc[0], " -> ".join(cyc)))
    return out


def check(graph: dict[str, list[str]]) -> list[Violation]:
    return sorted(set(check_imports(graph) + check_cycles(graph)))


def report(violations: list[Violation], rules: set[str]) -> str:
    hits = [v for v in violations if v.rule in rules]
    return "\n".join([f"{len(hits)} layering violation(s) (the rule: ALLOWED in tests/test_layering.py):"]
                     + [str(v) for v in hits])


def _rules(violations) -> set[tuple[str, str, str]]:
    return {(v.rule, v.module, v.imported) for v in violations}


# ---------------------------------------------------------------------------------------------------------------
# The house as it is
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def violations():
    graph = build_graph()
    assert len(graph) > 20 and "lmforge.infer.engine" in graph, "src/lmforge not found or not read"
    return check(graph)


def _assert_none(violations, *rules):
    if any(v.rule in rules for v in violations):
        pytest.fail(report(violations, set(rules)), pytrace=False)


def test_import_directions(violations):
    _assert_none(violations, DIRECTION, UNKNOWN)


def test_only_front_door_imports_stages_and_serve(violations):
    _assert_none(violations, FRONT_ONLY)


def test_only_front_door_uses_the_root(violations):
    _assert_none(violations, ROOT_LOAD, ROOT_NAME)


def test_no_package_cycles(violations):
    _assert_none(violations, PACKAGE_CYCLE)


def test_no_module_cycles(violations):
    _assert_none(violations, MODULE_CYCLE)


def test_no_private_imports(violations):
    _assert_none(violations, PRIVATE)


def test_the_table_keeps_its_nevers():
    """The lines the table must not lose: train and infer never import each other, the core imports only itself,
    and nothing lists stages or serve (only the front door imports them)."""
    assert "train" not in ALLOWED["infer"] and "infer" not in ALLOWED["train"]
    assert ALLOWED["core"] == set()
    assert all(not (ok & FRONT_DOOR_ONLY) for ok in ALLOWED.values())
    assert all(ok <= set(ALLOWED) for ok in ALLOWED.values())


# ---------------------------------------------------------------------------------------------------------------
# The checker itself: made-up graphs
# ---------------------------------------------------------------------------------------------------------------
def test_checker_reports_infer_importing_train():
    v = check({"lmforge.infer.engine": ["lmforge.train.trainer"]})
    assert (DIRECTION, "lmforge.infer.engine", "lmforge.train.trainer") in _rules(v)
    assert (DIRECTION, "lmforge.train.trainer", "lmforge.infer.engine:Engine") in _rules(
        check({"lmforge.train.trainer": ["lmforge.infer.engine:Engine"]}))
    ok = {"lmforge.infer.engine": ["lmforge.model.transformer", "lmforge.errors", "lmforge.infer.sampling"]}
    assert check(ok) == []


def test_checker_reports_module_and_package_cycles():
    v = check({"lmforge.model.a": ["lmforge.model.b:f"], "lmforge.model.b": ["lmforge.model.a"]})
    assert (MODULE_CYCLE, "lmforge.model.a", "lmforge.model.a -> lmforge.model.b -> lmforge.model.a") in _rules(v)
    # data and tokenizer may import each other, but not both ways
    v = check({"lmforge.data.x": ["lmforge.tokenizer.y"], "lmforge.tokenizer.y": ["lmforge.data.z"]})
    assert (PACKAGE_CYCLE, "data", "data -> tokenizer -> data") in _rules(v)
    assert not [x for x in v if x.rule == MODULE_CYCLE]  # x -> y -> z is no module cycle
    # a front-door module is left out of its package: infer/cli.py importing eval is no infer <-> eval cycle
    assert check({"lmforge.infer.cli": ["lmforge.eval.bpb"], "lmforge.eval.bpb": ["lmforge.infer.engine"]}) == []


def test_checker_reports_the_other_rules():
    rules = lambda g: {(r, m) for r, m, _ in _rules(check(g))}  # noqa: E731
    assert (FRONT_ONLY, "lmforge.eval.x") in rules({"lmforge.eval.x": ["lmforge.stages.sft"]})
    assert (FRONT_ONLY, "lmforge.rag.x") in rules({"lmforge.rag.x": ["lmforge.serve.app"]})
    assert (DIRECTION, "lmforge.errors") in rules({"lmforge.errors": ["lmforge.model.config"]})
    assert (ROOT_LOAD, "lmforge.eval.x") in rules({"lmforge.eval.x": ["lmforge:load"]})
    assert (ROOT_NAME, "lmforge.eval.x") in rules({"lmforge.eval.x": ["lmforge.cli"]})
    assert (PRIVATE, "lmforge.infer.x") in rules({"lmforge.infer.x": ["lmforge.model.transformer:_SDPA"]})
    assert (PRIVATE, "lmforge.infer.x") in rules({"lmforge.infer.x": ["lmforge.model._impl"]})
    assert (UNKNOWN, "lmforge.widgets.x") in rules({"lmforge.widgets.x": []})
    # allowed: the front door anywhere, __version__ anywhere, a private module inside its own package, stages -> train
    assert check({"lmforge.cli": ["lmforge.stages.sft", "lmforge:load"], "lmforge.quickstart": ["lmforge.train.a"],
                  "lmforge.train.cli": ["lmforge.infer.engine", "lmforge:load"],
                  "lmforge.data.x": ["lmforge:__version__"], "lmforge.model.a": ["lmforge.model._impl"],
                  "lmforge.stages.sft": ["lmforge.train.trainer", "lmforge.eval.bpb"]}) == []


def test_graph_builder_reads_every_kind_of_import(tmp_path):
    files = {
        "lmforge/__init__.py": "__version__ = '0'\ndef load(p): ...\n",
        "lmforge/errors.py": "",
        "lmforge/checkpoint.py": "",
        "lmforge/model/__init__.py": "",
        "lmforge/model/transformer.py": "_X = 1\n",
        "lmforge/train/__init__.py": "",
        "lmforge/train/trainer.py": "",
        "lmforge/infer/__init__.py": "from .engine import Engine\n",
        "lmforge/infer/engine.py": (
            "from typing import TYPE_CHECKING\n"
            "from lmforge import __version__\n"
            "from . import sampling\n"
            "from ..errors import E\n"
            "import lmforge\n"
            "if TYPE_CHECKING:\n    from lmforge.train.trainer import Trainer\n"
            "def f():\n"
            "    from lmforge import checkpoint as ck\n"
            "    from lmforge.model.transformer import _X\n"
            "    import importlib; importlib.import_module('lmforge.model')\n"
            "    return lmforge.load('x'), ck._private, lmforge.__version__\n"
            "class Engine: ...\n"),
        "lmforge/infer/sampling.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    g = build_graph(tmp_path)
    assert g["lmforge.infer"] == ["lmforge.infer.engine:Engine"]
    assert g["lmforge.infer.engine"] == sorted([
        "lmforge.infer.sampling", "lmforge.errors:E", "lmforge.train.trainer:Trainer", "lmforge.checkpoint",
        "lmforge.checkpoint:_private", "lmforge.model.transformer:_X", "lmforge.model", "lmforge:load"])
    got = _rules(check(g))
    assert (DIRECTION, "lmforge.infer.engine", "lmforge.train.trainer:Trainer") in got
    assert (ROOT_LOAD, "lmforge.infer.engine", "lmforge:load") in got
    assert (PRIVATE, "lmforge.infer.engine", "lmforge.model.transformer:_X") in got
    assert (PRIVATE, "lmforge.infer.engine", "lmforge.checkpoint:_private") in got
    assert len(got) == 4, got
