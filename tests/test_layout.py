"""The package's shape, pinned: import arrows run one way (no library module imports the
command line, the client nothing of the server, the wire format nothing above it, no
import circles), SGLang stays behind its one module, modules stay readable in size, and
every module's ``__all__`` names exactly its public definitions."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

import eagle3_target

ROOT = Path(eagle3_target.__file__).resolve().parent
PKG = "eagle3_target"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = [PKG, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, *, module_level_only: bool) -> set[str]:
    """Modules of the package that ``path`` imports (at module level only, or anywhere),
    leaving out imports under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                if top or not module_level_only:
                    found.update(a.name for a in child.names if a.name.startswith(PKG))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if (top or not module_level_only) and child.module.startswith(PKG):
                    for a in child.names:
                        sub = f"{child.module}.{a.name}"
                        found.add(sub if sub in MODULES else child.module)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                visit(child, False)
            else:
                visit(child, top)

    visit(tree, True)
    return found


def test_no_library_module_imports_the_command_line():
    def is_cli(name: str) -> bool:
        return name == f"{PKG}.cli" or name.startswith(f"{PKG}.cli.")

    bad = {m: sorted(i for i in _imports(p, module_level_only=False) if is_cli(i))
           for m, p in MODULES.items() if not is_cli(m)}
    assert not {m: v for m, v in bad.items() if v}


# room -> rooms it must not import (anywhere, lazily included); ``engines.common``, which
# imports nothing of the package, is open to all.
ONE_WAY = {
    "client": ("server", "cli", "dump", "engines"),
    "wire": ("server", "client", "dump", "engines", "cli", "contract", "data"),
    "engines": ("server", "client", "dump", "cli", "data"),
    "data": ("server", "client", "dump", "engines", "cli", "wire", "contract"),
    "server": ("client", "dump", "cli", "data"),
    "dump": ("server", "cli", "export", "regen"),
    "export": ("server", "client", "cli", "regen"),
    "regen": ("server", "client", "cli", "export"),
}


@pytest.mark.parametrize("room", sorted(ONE_WAY))
def test_rooms_import_one_way(room):
    forbidden = ONE_WAY[room]
    bad = {}
    for m, p in MODULES.items():
        if m == f"{PKG}.{room}" or m.startswith(f"{PKG}.{room}."):
            hits = sorted(i for i in _imports(p, module_level_only=False)
                          if i != f"{PKG}.engines.common"
                          and any(i == f"{PKG}.{f}" or i.startswith(f"{PKG}.{f}.") for f in forbidden))
            if hits:
                bad[m] = hits
    assert not bad


def test_engines_import_the_contract_only_for_type_checking_or_in_the_runner_modules():
    # The registry and its helpers never import the contract, so the contract can call
    # build_runner without a circle; the runner modules implement the contract.
    for m in ("engines", "engines.common", "engines.packing"):
        assert f"{PKG}.contract" not in _imports(MODULES[f"{PKG}.{m}"], module_level_only=False)


def test_no_import_circles_at_module_level():
    graph = {m: {i for i in _imports(p, module_level_only=True) if i in MODULES and i != m}
             for m, p in MODULES.items()}
    # A package's own __init__ importing its submodules is how re-exports work; the
    # circles that matter run between modules.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                dfs(n)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            dfs(m)
    assert not cycles


def test_only_the_sglang_engine_imports_sglang():
    users = []
    for m, p in MODULES.items():
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            if any(n == "sglang" or n.startswith("sglang.") for n in names):
                users.append(m)
    assert set(users) <= {f"{PKG}.engines.sglang"}


def test_modules_stay_under_500_lines():
    long = {m: n for m, p in MODULES.items()
            if (n := len(p.read_text().splitlines())) > 500 and m != f"{PKG}.engines.sglang"}
    assert not long


def _public_definitions(path: Path) -> set[str]:
    """Functions, classes and UPPER_CASE constants defined at the module's top level."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper())
    return {n for n in names if not n.startswith("_")}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_all_names_exactly_the_public_definitions(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the old import paths
        mod = importlib.import_module(module)
    path = MODULES[module]
    declared = getattr(mod, "__all__", None)
    if declared is None:
        assert not _public_definitions(path), f"{module} defines public names but has no __all__"
        return
    assert len(declared) == len(set(declared)), "a name is listed twice"
    missing = [n for n in declared if not hasattr(mod, n)]
    assert not missing, f"{module}.__all__ lists names it does not have: {missing}"
    unlisted = sorted(_public_definitions(path) - set(declared))
    assert not unlisted, f"{module} defines public names missing from __all__: {unlisted}"
