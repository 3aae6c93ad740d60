"""The package layers hold: no import cycle among the project's own modules, counting every import
statement (also those inside functions), and img_core never imports ui/ or trainer/.

The graph is read from the source with `ast`, so nothing is imported to check it."""

from __future__ import annotations

import ast
import fnmatch
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("img_core", "ui", "trainer")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    files = [ROOT / "app.py"] + [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    return {module_name(path): path for path in files}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports anywhere in its body: `from a.b import c` counts as a.b.c when
    that is a module, else as a.b; relative imports are resolved against the file's package."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `import img_core.mllm.critic` where only the prefix is ours
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(path, modules) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert len(graph) > 60, "the checker found too few modules"
    assert "img_core.session" in graph["img_core.cli.main"]  # imported inside `refine()`


def test_no_import_cycle_among_the_project_modules():
    assert cycles(import_graph()) == []


def test_img_core_never_imports_ui_trainer_or_app():
    graph = import_graph()
    offending = {
        module: sorted(target for target in targets if not target.startswith("img_core"))
        for module, targets in graph.items()
        if module.startswith("img_core")
    }
    assert {module: targets for module, targets in offending.items() if targets} == {}


def test_ui_and_trainer_do_not_import_each_other():
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith("ui"):
            assert not any(target.startswith("trainer") for target in targets), module
        if module.startswith("trainer"):
            assert not any(target.startswith(("ui", "app")) for target in targets), module


# img_core's floors, as docs/ARCHITECTURE.md draws them: a module imports only from its own floor or the
# floors below. Every module must be placed (fnmatch patterns; the first that matches decides).
FLOORS = {
    # 3, programs: the commands and the evaluation runs over a session
    "img_core.cli": 3, "img_core.cli.*": 3, "img_core.__main__": 3, "img_core.evaluation.evaluate": 3, "img_core.evaluation.study": 3,
    # 2, loaded models: the one MLLM loader, the scorers and the session
    "img_core.mllm.loading": 2, "img_core.evaluation.scorers": 2, "img_core.session": 2,
    # 1, weights on disk: the real ones fetched and converted, the tiny ones built
    "img_core.weights.*": 1, "img_core.tiny.mllm": 1, "img_core.tiny.models": 1, "img_core.tiny.scorers": 1,
    # 0, parts: everything a round or a score is made of that needs no weights on disk
    "img_core*": 0,
}


def floor_of(module: str) -> int:
    return next(floor for pattern, floor in FLOORS.items() if fnmatch.fnmatchcase(module, pattern))


def test_img_core_modules_import_only_from_their_floor_or_below():
    upward = [
        f"{module} (floor {floor_of(module)}) imports {target} (floor {floor_of(target)})"
        for module, targets in import_graph().items() if module.startswith("img_core")
        for target in targets if floor_of(target) > floor_of(module)
    ]
    assert upward == []
    assert [floor_of(m) for m in ("img_core.cli.main", "img_core.session", "img_core.tiny.models", "img_core.clip_processing")] == [3, 2, 1, 0]


COMMENTED_AT_THE_TOP = {"img_core/cli/main.py"}  # says once, at its top, why it imports inside functions
HEAVY_PACKAGES = {"torch", "transformers", "diffusers", "accelerate", "peft", "gradio", "bitsandbytes", "optimum"}


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of each import of a project module inside a function of `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom) and (inner.module or "").split(".")[0] in PACKAGES:
                found.append((inner.lineno, inner.module))
            elif isinstance(inner, ast.Import):
                found += [(inner.lineno, alias.name) for alias in inner.names if alias.name.split(".")[0] in PACKAGES]
    return found


@functools.cache
def module_level_imports(path: Path) -> set[str]:
    """Every module name `path` imports when it is imported itself (statements outside functions;
    `if TYPE_CHECKING:` blocks left out), project modules and third-party ones alike."""
    names = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names.add(node.module or "")
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body + node.orelse)
            elif isinstance(node, (ast.Try, ast.With)):
                visit(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []))

    visit(ast.parse(path.read_text()).body)
    return names


def loads_a_heavy_package(module: str, modules: dict[str, Path]) -> bool:
    """Whether importing `module` imports torch, transformers, gradio, ... (directly or through the project
    modules it imports at module level, their packages' `__init__` included)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for prefix in (".".join(parts[: i + 1]) for i in range(len(parts))):
            if prefix in modules and prefix not in seen:
                seen.add(prefix)
                for imported in module_level_imports(modules[prefix]):
                    if imported.split(".")[0] in HEAVY_PACKAGES:
                        return True
                    if imported.split(".")[0] in PACKAGES:
                        todo.append(imported)
    return False


def test_the_heaviness_check_tells_torch_from_light_modules():
    modules = project_modules()
    assert loads_a_heavy_package("img_core.session", modules)
    assert loads_a_heavy_package("img_core.cli.evaluate", modules)  # through img_core.evaluation.evaluate
    assert not loads_a_heavy_package("img_core.settings", modules)
    assert not loads_a_heavy_package("img_core.errors", modules)


def test_imports_inside_functions_defer_something_heavy_and_say_why():
    """A function-level import of a project module is kept only to defer a heavy import (torch and the
    like): the module it imports must really load one, the file must not import it at its top already,
    and a comment (on the line, the one above, or once at the file's top) says why. Hidden imports were how
    the old import circles hid."""
    modules = project_modules()
    unexplained, light, redundant = [], [], []
    for path in modules.values():
        relative = str(path.relative_to(ROOT))
        lines = path.read_text().splitlines()
        at_top = module_level_imports(path)
        for line, module in function_level_imports(path):
            said = "#" in lines[line - 1] or lines[line - 2].strip().startswith("#")
            if not said and relative not in COMMENTED_AT_THE_TOP:
                unexplained.append(f"{relative}:{line} {module}")
            if not loads_a_heavy_package(module, modules):
                light.append(f"{relative}:{line} {module}")
            if module in at_top:
                redundant.append(f"{relative}:{line} {module}")
    assert (unexplained, light, redundant) == ([], [], [])
