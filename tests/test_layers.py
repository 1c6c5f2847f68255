"""The package's layers: each module imports only its own layer and the layers before it.

The path data takes, in the order the code depends on it (data.transforms needs the models'
Preprocessing, so models come before data). Lazy imports inside functions count too: a
cycle hidden in a function body is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "thaw"  # parsed, never imported: fast, and no import error can hide a violation
FACADE = "thaw"  # thaw/__init__.py re-exports the public API; nothing inside the package imports it by name
LAYERS: list[set[str]] = [
    {"errors", "_io", "_numbers", "_version", "_allocator", "_device"},
    {"distributed"},
    {"models"},
    {"data"},
    {"plan"},
    {"train"},
    {"export", "integrations"},
    {"demo"},
    {"cli", "__main__", FACADE},
]


def _rank(layer: str) -> int:
    ranks = [index for index, members in enumerate(LAYERS) if layer in members]
    assert ranks, f"thaw/{layer} is in no layer; add it to LAYERS in {Path(__file__).name} where its imports put it"
    return ranks[0]


def _layer_of(module: str) -> str:
    """`thaw.train.fit` -> train; `thaw` -> the facade."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACADE


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The thaw modules one import statement names (`from thaw import distributed` names thaw.distributed)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "thaw"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: resolve against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "thaw":
        return []
    if base != "thaw":
        return [base]
    submodules = [f"thaw.{a.name}" for a in node.names if (PACKAGE / f"{a.name}.py").exists() or (PACKAGE / a.name).is_dir()]
    return submodules if len(submodules) == len(node.names) else ["thaw"]


def layer_violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        own = _layer_of(module)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported(node, module, path.name == "__init__.py"):
                theirs = _layer_of(target)
                if _rank(theirs) > _rank(own):
                    line = getattr(node, "lineno", 0)
                    problems.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {target} ({theirs}, a later layer)")
    return problems


def test_no_module_imports_a_later_layer() -> None:
    """thaw.models must not reach into thaw.plan, nor thaw.train into thaw.export: each is a cycle."""
    problems = layer_violations()
    assert not problems, "\n".join(problems)

