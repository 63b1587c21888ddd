"""The package's import structure: every module imports on its own, the modules import one another
without a circle (also none hidden in a function-local import), and no module imports another's
private (``_name``) names."""

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "zeros_lm"
PACKAGE_DIR = REPO / PACKAGE


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (packages by their own name)."""
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py")) if "__pycache__" not in p.parts}


MODULES = package_modules()


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _under_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def package_imports(name: str) -> list[tuple[str, list[str], int]]:
    """The imports of package modules in module ``name`` (module-level and inside functions alike):
    (the module imported from, the names imported, line)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if _under_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] == PACKAGE:
                found.append((source, [a.name for a in node.names], node.lineno))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules that importing it runs. ``from a.b import c`` runs ``a.b.c``
    when that is a module, else ``a.b``, and every package above it that the importing module is
    not itself inside (those are initialised before it)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for source, names, _ in package_imports(name):
            targets = [f"{source}.{n}" for n in names if f"{source}.{n}" in MODULES]
            if len(targets) < len(names) or not names:
                targets.append(source)
            for target in targets:
                if target not in MODULES:
                    continue
                own = {name, *_ancestors(name)}
                graph[name] |= {t for t in (target, *_ancestors(target)) if t not in own}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One circle of imports (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports() -> list[str]:
    """``module:line: from source import _name`` for every private name a package module imports
    from another package module (a private *module* of the package, ``_locks``, may be imported)."""
    found = []
    for name in MODULES:
        for source, names, line in package_imports(name):
            if source == name:
                continue
            for imported in names:
                if _is_private(imported) and f"{source}.{imported}" not in MODULES:
                    found.append(f"{name}:{line}: from {source} import {imported}")
    return found


# ------------------------------------------------------------------------------------------
def test_the_graph_sees_every_kind_of_import():
    """The walk itself: relative (one and two dots), absolute, and function-local imports."""
    graph = import_graph()
    assert "zeros_lm.configuration_zeros" in graph["zeros_lm.modeling_zeros"]  # module level, relative
    assert "zeros_lm._locks" in graph["zeros_lm.data.cache"]  # two dots
    assert "zeros_lm.data" in graph["zeros_lm.cli.train"]  # absolute
    assert "zeros_lm.ops_fused" in graph["zeros_lm.ops"]  # function-local (Triton is optional)
    assert "zeros_lm.data" not in graph["zeros_lm.data.module"]  # its own package runs before it
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "modules import one another in a circle: " + " -> ".join(cycle)


def test_no_private_name_is_imported_from_another_module():
    found = private_imports()
    assert not found, "private names imported across modules (make them public or move them):\n" + "\n".join(found)


# Run in a fresh interpreter: the third-party libraries the package imports are loaded once, then
# each package module is imported in a forked child that has none of the package loaded yet.
_IMPORT_EACH = r"""
import importlib, json, os, sys, traceback
modules, libraries = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for library in libraries:
    try:
        importlib.import_module(library)
    except Exception:
        pass
assert not [m for m in sys.modules if m.split(".")[0] == "zeros_lm"]
failures = {}
for module in modules:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(module)
            status = 0
        except BaseException:
            os.write(write, traceback.format_exc()[-2000:].encode())
            status = 1
        os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        message = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failures[module] = message or f"exit status {status}"
print(json.dumps(failures))
"""


def _third_party_libraries() -> list[str]:
    """The modules outside the package that package modules import at module level."""
    libraries = set()
    for path in MODULES.values():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                libraries |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                libraries.add(node.module)
    top = lambda m: m.split(".")[0]  # noqa: E731
    return sorted(m for m in libraries if top(m) != PACKAGE and top(m) not in sys.stdlib_module_names)


def test_every_module_imports_on_its_own(clean_env):
    modules = [m for m in MODULES if not m.endswith("__main__")]  # those run a command when imported
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, json.dumps(modules), json.dumps(_third_party_libraries())],
        cwd=REPO,
        env=dict(clean_env, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(f"import {m} alone fails:\n{tb}" for m, tb in failures.items())
