"""The package's import graph has no cycles, lazy (function-level) imports included: each module can be
read knowing only the modules below it; modules and functions stay small enough to read at once."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "yarn_jax"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """yarn_jax modules that `module` imports anywhere in its source (`from pkg import sub` counts as sub)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                      for a in node.names}
    return {m for m in found if m in modules and m != module}


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    state: dict[str, str] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", "import cycle: " + " -> ".join([*stack[stack.index(n):], m, n])
            if n not in state:
                visit(n, [*stack, m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert "yarn_jax.attention.ring" in graph and "yarn_jax.model.llama" in graph  # the graph was built


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def test_modules_and_functions_stay_small():
    """No module over 400 lines, no function (or method) over 60: each can be read at once."""
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{path.name}: {len(text.splitlines())}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.name}:{node.lineno} {node.name}: {lines}")
    assert not long_modules and not long_functions, (long_modules, long_functions)


def test_only_test_aot_compiles_for_tpu_topologies():
    """libtpu lets one process at a time hold it, and the suite runs test files on two workers
    (`--dist loadfile`): every test that reaches libtpu must sit in test_aot.py."""
    reaching = ("topology_devices", "get_topology_desc", "aot.report(", "aot.generation_report(")
    tests = Path(__file__).resolve().parent
    offenders = [p.name for p in tests.glob("*.py") if p.name not in ("test_aot.py", Path(__file__).name)
                 and any(name in p.read_text() for name in reaching)]
    assert not offenders, offenders
