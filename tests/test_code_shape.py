"""The shape of the code: imports go down the floors of the architecture, never up or around in
a cycle, and no function grows past what one reads in a sitting.

The floors (docs/ARCHITECTURE.md): layers and audio at the bottom, then the network and its
config, the model, the data and inference, evaluation, and the entry points on top. Every import
is counted, including the ones inside functions and under `TYPE_CHECKING`: a lazy import is a
dependency too.
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 100

# Module (or package prefix) -> floor. A module may import modules of its own floor or below.
FLOORS = {
    "spectron_jax": 0,
    "spectron_jax.interfaces": 0,
    "spectron_jax.audio": 0,
    "spectron_jax.nn": 0,
    "spectron_jax.vocabularies": 0,
    "spectron_jax.losses": 1,
    "spectron_jax.config": 1,
    "spectron_jax.network": 1,
    "spectron_jax.partitioning": 1,
    "spectron_jax.multihost": 1,
    "spectron_jax.feature_converter": 1,
    "spectron_jax.convert": 1,
    # Scores plain strings (numpy, jiwer): low enough for the seqio tasks to register them.
    "spectron_jax.evaluation.metrics": 3,
    "spectron_jax.evaluation.text": 3,
    "spectron_jax.evaluation.seqio_metrics": 3,
    "spectron_jax.decoding": 2,
    "spectron_jax.flops": 2,
    "spectron_jax.trainer": 2,
    "spectron_jax.summaries": 2,
    "spectron_jax.models": 3,
    "spectron_jax.checkpoints": 3,
    "spectron_jax.pretraining.text_lm": 3,
    "spectron_jax.pretraining.ctc_encoder": 3,
    "spectron_tasks": 4,
    "spectron_tasks.number_text": 4,
    "spectron_tasks.recipe_mixtures": 4,
    "spectron_jax.data": 5,
    "spectron_jax.feature_cache": 6,
    "spectron_jax.inference": 5,
    "spectron_jax.convert.t5x_checkpoint": 5,
    "spectron_jax.evaluation": 6,
    "spectron_jax.evaluation.judges": 6,
    "spectron_jax.pretraining.ctc_evaluation": 6,
    "spectron_tasks.counting_evaluation": 7,
    "spectron_jax.t5x_adapter": 7,
    "spectron_jax.config_check": 7,
    "spectron_jax.train": 8,
    "spectron_jax.aot": 9,
    "spectron_jax.demo": 8,
    "spectron_jax.cli": 9,
}
PACKAGES = {"spectron_jax": REPO / "spectron_jax", "spectron_tasks": REPO / "tasks"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def floor(module: str) -> int:
    """The floor of a module: its longest prefix in FLOORS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in FLOORS:
            return FLOORS[prefix]
    raise KeyError(f"{module} has no floor: add it (or its package) to FLOORS")


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str | None:
    """The first-party module an imported name lives in (None for third-party names)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _parse_all() -> dict[pathlib.Path, ast.Module]:
    roots = [*PACKAGES.values(), REPO / "benchmarks", REPO / "scripts"]
    return {
        path: ast.parse(path.read_text(), filename=str(path))
        for root in roots
        for path in sorted(root.rglob("*.py"))
    }


# Parsed at import, while pytest collects and before any test has started a thread: CPython
# 3.11 keeps one AST-construction state per interpreter, and a traceback formatted meanwhile on
# another thread (3.11 parses source lines for its ^^^ markers, e.g. an unraisable exception in
# a finished test's checkpoint thread) breaks a parse with "SystemError: AST constructor
# recursion depth mismatch".
TREES = _parse_all()
PROBE_SOURCE = (
    "from typing import TYPE_CHECKING\n"
    "if TYPE_CHECKING:\n    from spectron_jax.models import SpectronModel\n"
    "def f():\n    from spectron_jax import cli\n"
)
PROBE_TREE = ast.parse(PROBE_SOURCE)


def _imports(
    module: str, path: pathlib.Path, modules: dict[str, pathlib.Path], tree: ast.Module
) -> set[str]:
    """First-party modules `module` (file `path`, parsed as `tree`) imports anywhere."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules, TREES[p]) for m, p in modules.items()}


def test_every_module_has_a_floor(graph):
    for module in graph:
        floor(module)


def test_no_import_goes_up_a_floor(graph):
    upward = [
        f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
        for m, targets in graph.items()
        for t in sorted(targets)
        if floor(t) > floor(m) and not m.startswith(t + ".")  # a module may use its package
    ]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle(graph):
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if module.startswith(target + "."):
                continue  # importing one's own package (its __init__) is not a cycle
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_checks_see_real_violations(tmp_path):
    """The walker finds lazy and TYPE_CHECKING imports, so the tests above can fail."""
    path = tmp_path / "probe.py"
    path.write_text(PROBE_SOURCE)
    modules = _modules()
    found = _imports("spectron_jax.nn.probe", path, modules, PROBE_TREE)
    assert found == {"spectron_jax", "spectron_jax.models", "spectron_jax.cli"}
    assert floor("spectron_jax.nn.probe") < floor("spectron_jax.models")


def _functions():
    for path, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path.relative_to(REPO), node


def test_no_function_is_longer_than_100_lines():
    long = [
        f"{path}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
        for path, node in _functions()
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "\n".join(long)
