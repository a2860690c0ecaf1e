"""The house rules that keep the code readable, checked on the source (STYLE.md rules 11-13):
no private name used across modules, imports that point one way (no cycle), every module
importable on its own, and functions short enough to read in one screen."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the installed layout: minicnn/ is the package, cli/ is installed as minicnn.cli
PACKAGES = {"minicnn": ROOT / "minicnn", "minicnn.cli": ROOT / "cli"}
CHECKED = list(PACKAGES.values()) + [ROOT / "benchmarks"]
# the longest function body (lines, from its def to its last line) the code may have
MAX_FUNCTION_LINES = 60
# declarative lists that are long by nature (one entry per option), not logic
DECLARATIVE = {("cli/options.py", "training_options")}
# imports that point back up, each a deferred call into an optional extra, allowed by name:
REVERSE_EDGES = {
    # net.to_torch() (issue 19) hands the network to the PyTorch bridge, which sits above the
    # network (it builds Networks and records runs) and imports torch only when called
    ("minicnn.network", "minicnn.torch"),
}


def modules():
    """{dotted module name: path} of the package and the CLI."""
    out = {}
    for pkg, base in PACKAGES.items():
        for p in sorted(base.rglob("*.py")):
            rel = p.relative_to(base).with_suffix("")
            parts = [pkg] + [x for x in rel.parts if x != "__init__"]
            out[".".join(parts)] = p
    return out


def resolve(name, path, node):
    """The absolute module an ImportFrom refers to (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    is_pkg = path.name == "__init__.py"
    base = name.split(".")
    base = base if is_pkg else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name, path):
    """[(imported module, imported names, line)] of every import in a module, function-level included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((resolve(name, path, node), [a.name for a in node.names], node.lineno))
    return out


def test_no_private_name_is_imported_across_modules():
    mods = modules()
    bad = []
    for name, path in list(mods.items()) + [(f"benchmarks.{p.stem}", p) for p in (ROOT / "benchmarks").glob("*.py")]:
        for mod, names, line in imports(name, path):
            if not mod.startswith("minicnn"):
                continue
            bad += [f"{path.relative_to(ROOT)}:{line} imports {mod}.{n}" for n in names
                    if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_no_private_attribute_of_another_module_or_object():
    """``x._name`` only on self/cls: no module reaches into another's (or another object's) privates."""
    bad = []
    for base in CHECKED:
        for p in base.rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                        and not (isinstance(node.value, ast.Name) and node.value.id in ("os", "sys"))):
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert not bad, "\n".join(bad)


def import_graph():
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for mod, names, _ in imports(name, path):
            for cand in [mod] + [f"{mod}.{n}" for n in names]:
                # a parent package is not a dependency (Python imports it first anyway)
                if (cand in mods and cand != name and not name.startswith(cand + ".")
                        and (name, cand) not in REVERSE_EDGES):
                    deps.add(cand)
        graph[name] = deps
    return graph


def test_imports_have_no_cycle():
    """Imports point one way (function-level imports count too), except the REVERSE_EDGES."""
    graph = import_graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_module_imports_on_its_own():
    """Each module in a fresh interpreter (CUDA only where the simulator stands in for a GPU)."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import {m}"], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for m in modules()}
    failed = {m: p.communicate()[0].strip().splitlines()[-1:] for m, p in procs.items()}
    failed = {m: out for m, out in failed.items() if procs[m].returncode != 0}
    assert not failed, failed


@pytest.mark.parametrize("base", CHECKED, ids=lambda p: p.name)
def test_functions_are_short(base):
    long = []
    for p in base.rglob("*.py"):
        rel = str(p.relative_to(ROOT))
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (rel, node.name) not in DECLARATIVE:
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)
