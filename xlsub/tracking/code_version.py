"""A code version per stage: what a finished run is reused by.

A stage's version digests only the source that can change its results: its entry module, every project
module in that module's static import closure (imports inside functions included, found from the source
because `main` decides reuse before a stage runs), the stage's block of MLproject and the dependency pins
of pyproject.toml. So a change to code that only `analyze` uses leaves the finished finetune, prune and
encode runs reusable, and an upgrade of a pinned library recomputes every stage. The pins, not the
installed builds: a `+cpu` and a `+cu130` build of the same torch reuse each other's runs.

A digest rather than the git commit: it also tells uncommitted changes apart, and works without git.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

import yaml

import xlsub

PACKAGES = ("xlsub", "entry_points")
ROOT = Path(xlsub.__file__).resolve().parents[1]


def _module_file(root: Path, name: str) -> Path | None:
    """The file of project module `name` (`xlsub.similarity.cka` -> xlsub/similarity/cka.py, a package -> its __init__.py)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement in `path` may load (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from xlsub import data` loads a module
    return names


def import_closure(module: str, root: Path = ROOT) -> list[Path]:
    """The files of `module` and of every project module it imports, directly or not, sorted; the
    `__init__.py` of each package on the way is included, since importing a submodule runs it."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # parent packages first
            prefix = ".".join(parts[:i])
            path = _module_file(root, prefix)
            if path is None or prefix in seen:
                continue
            seen[prefix] = path
            todo.extend(_imported_names(path, prefix))
    return sorted(set(seen.values()))


def mlproject_block(stage: str, root: Path = ROOT) -> str:
    """The stage's entry in MLproject, in a canonical form (key order and spacing do not count)."""
    path = root / "MLproject"
    if not path.is_file():
        return ""
    block = (yaml.safe_load(path.read_text()) or {}).get("entry_points", {}).get(stage, {})
    return yaml.safe_dump(block, sort_keys=True)


def dependency_pins(root: Path = ROOT) -> str:
    """The runtime requirements as pyproject.toml pins them (extras, which only tests and benchmarks use, left
    out), one per line; from the installed package's metadata where no pyproject.toml lies beside the code."""
    import importlib.metadata

    path = root / "pyproject.toml"
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = None
    if path.is_file() and tomllib is not None:
        pins = tomllib.loads(path.read_text(encoding="utf-8")).get("project", {}).get("dependencies", [])
    else:
        pins = [r for r in importlib.metadata.requires("xlsub") or [] if "extra ==" not in r]
    return "\n".join(sorted(" ".join(pin.split()) for pin in pins))


@lru_cache(maxsize=None)
def code_version(stage: str, root: Path = ROOT) -> str:
    """`<package version>+<16 hex digits>`: sha256 over the stage's import closure, MLproject block and the
    dependency pins."""
    digest = hashlib.sha256()
    for path in import_closure(f"entry_points.{stage}", root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(b"MLproject\0" + mlproject_block(stage, root).encode())
    digest.update(b"pyproject.toml\0" + dependency_pins(root).encode())
    return f"{xlsub.__version__}+{digest.hexdigest()[:16]}"
