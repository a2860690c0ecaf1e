"""The backend contract: ref, cpu and cuda define every function of minicnn.ops.Backend with the
same signature (names, order, defaults), and the constants it names. Read from the source, so the
CUDA module is checked without numba.cuda."""
import ast
from pathlib import Path

import pytest

OPS = Path(__file__).resolve().parents[1] / "minicnn" / "ops"


def signature(fn, drop_self=False):
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args]
    if drop_self:
        names = names[1:]
    defaults = [ast.unparse(d) for d in a.defaults]
    return names, defaults, [x.arg for x in a.kwonlyargs], a.vararg is not None, a.kwarg is not None


def contract():
    tree = ast.parse((OPS / "__init__.py").read_text())
    proto = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Backend")
    funcs = {n.name: signature(n, drop_self=True) for n in proto.body if isinstance(n, ast.FunctionDef)}
    consts = [n.target.id for n in proto.body if isinstance(n, ast.AnnAssign)]
    return funcs, consts


def module_defs(name):
    """{name: signature} of a backend's functions, and the names bound at module level (imports too)."""
    tree = ast.parse((OPS / f"{name}.py").read_text())
    funcs, names = {}, set()
    for n in tree.body:
        if isinstance(n, ast.FunctionDef):
            funcs[n.name] = signature(n)
            names.add(n.name)
        elif isinstance(n, ast.Assign):
            names.update(t.id for t in n.targets if isinstance(t, ast.Name))
        elif isinstance(n, ast.ImportFrom):
            names.update(a.asname or a.name for a in n.names)
    return funcs, names, tree


@pytest.mark.parametrize("backend", ["ref", "cpu", "cuda"])
def test_backend_meets_the_contract(backend):
    funcs, consts = contract()
    assert len(funcs) > 20
    defs, names, _ = module_defs(backend)
    ref_defs, _, _ = module_defs("ref")
    missing = [f for f in funcs if f not in names] + [c for c in consts if c not in names]
    assert not missing, f"{backend} lacks {missing}"
    for f, sig in funcs.items():
        own = defs.get(f, ref_defs.get(f))          # cpu re-exports some of ref's host functions
        assert own == sig, f"{backend}.{f}: {own} differs from the contract {sig}"
