"""The package's dependency order, checked on the source (every import statement, wherever it stands).

    utils < merging < config < models < data | metrics < compress < build < deploy < engine < index
          < integrations | cli | video                             (tools/ and tests/ sit on top)

A module imports its own package and the layers below it; packages that share a layer do not import
each other. Imports of the package's own modules stand at the top of a module, never inside a function,
so that this order is the whole truth (a function-local import hid a cycle through 31 modules once).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "reid_lite"

#: Bottom to top; the names in one entry share a layer.
LAYERS: list[tuple[str, ...]] = [
    ("utils",),
    ("merging",),
    ("config",),
    ("models",),
    ("data", "metrics"),
    ("compress",),
    ("build",),
    ("deploy",),
    ("engine",),
    ("index",),
    ("integrations", "cli", "video"),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}

#: Project modules that need an optional extra (a dependency outside install_requires) and so may be imported
#: inside the function that needs them. Each entry names the extra.
OPTIONAL_EXTRA_MODULES: dict[str, str] = {
    "reid_lite.integrations.torchreid": "torchreid",
}


def module_name(path: Path, root: Path = ROOT) -> str:
    """'reid_lite.merging.stm' for reid_lite/merging/stm.py ('reid_lite.merging' for its __init__.py)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, node: ast.Import | ast.ImportFrom, root: Path = ROOT) -> list[str]:
    """The reid_lite modules an import statement of `path` names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "reid_lite"]
    if node.level:
        base = module_name(path, root).split(".")
        if path.name != "__init__.py":
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] if target.split(".")[0] == "reid_lite" else []


def layer_of(module: str) -> str | None:
    """The layer name of a reid_lite module ('merging' for reid_lite.merging.stm); None for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def layer_violations(files: list[Path], root: Path = ROOT) -> list[str]:
    """'a -> b' for every import of a higher layer or of a package sharing the importer's layer."""
    bad = []
    for path in files:
        own = layer_of(module_name(path, root))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in imported_modules(path, node, root):
                other = layer_of(target)
                if own is None or other is None or other == own:
                    continue
                if RANK[other] >= RANK[own]:
                    bad.append(f"{path.relative_to(root)}:{node.lineno}: {own} imports {target} ({other} is not below)")
    return bad


def function_local_imports(files: list[Path], root: Path = ROOT) -> list[str]:
    """Imports of the project's own modules inside a function body (optional extras excepted)."""
    bad = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    bad += [f"{path.relative_to(root)}:{node.lineno}: {target} inside {func.name}()"
                            for target in imported_modules(path, node, root)
                            if not any(target == m or target.startswith(m + ".") for m in OPTIONAL_EXTRA_MODULES)]
    return sorted(set(bad))


def test_every_package_has_a_layer():
    packages = {layer_of(module_name(p)) for p in package_files()} - {None}
    assert packages == set(RANK), f"packages without a layer: {packages - set(RANK)}; layers without a package: " \
                                  f"{set(RANK) - packages}"


def test_modules_import_only_lower_layers():
    assert not layer_violations(package_files())


def test_no_function_local_imports_of_the_project():
    files = [*package_files(), *sorted((ROOT / "tools").glob("*.py"))]
    assert not function_local_imports(files)


def test_the_checks_see_a_violation(tmp_path):
    """The two checks fail on a module that breaks them (guards against a check that passes vacuously)."""
    fake = tmp_path / "reid_lite" / "merging" / "probe.py"
    fake.parent.mkdir(parents=True)
    source = "from ..engine import evaluator\n\n\ndef late():\n    from ..utils import device\n    return device\n"
    fake.write_text(source, encoding="utf-8")
    assert layer_violations([fake], tmp_path) == [
        "reid_lite/merging/probe.py:1: merging imports reid_lite.engine (engine is not below)"]
    assert function_local_imports([fake], tmp_path) == ["reid_lite/merging/probe.py:5: reid_lite.utils inside late()"]


def loaded_project_modules(statement: str) -> list[str]:
    """The reid_lite modules a fresh interpreter has loaded after `statement`."""
    code = f"{statement}\nimport sys\nprint('\\n'.join(sorted(m for m in sys.modules if m.startswith('reid_lite'))))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.parametrize("package, allowed", [
    ("reid_lite.metrics", {"metrics"}),
    ("reid_lite.merging", {"merging", "utils"}),
])
def test_a_library_import_loads_its_own_layers_only(package, allowed):
    loaded = loaded_project_modules(f"import {package}")
    layers = {layer_of(m) for m in loaded} - {None}
    assert layers == allowed, loaded
    assert not [m for m in loaded if layer_of(m) in ("index", "deploy", "engine", "build", "config")]


def test_the_vector_index_imports_nothing_of_the_project():
    """`index/vector_index.py` is a generic faiss wrapper (evaluation uses it too): no gallery errors, no gallery
    files; the gallery's storage reads and writes its segments and turns its errors into gallery errors."""
    path = PACKAGE / "index" / "vector_index.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [t for n in nodes for t in imported_modules(path, n)]


def private_attributes_shared_across_files(files: list[Path], root: Path = ROOT) -> dict[str, list[str]]:
    """{class: [attribute (files)]} for every `self._name` that a class and its package-defined bases or mixins
    (resolved by name) touch in more than one file: state one half of a class reads that another file writes."""
    classes: dict[str, tuple[str, list[str], set[str]]] = {}  # name -> (file, base names, private self attributes)
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                attrs = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
                         and isinstance(n.value, ast.Name) and n.value.id == "self"
                         and n.attr.startswith("_") and not n.attr.startswith("__")}
                attrs |= {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)
                          and isinstance(n.target, ast.Name) and n.target.id.startswith("_")}
                bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
                classes[node.name] = (str(path.relative_to(root)), bases, attrs)

    def lineage(name: str) -> list[str]:
        out, todo = [], [name]
        while todo:
            current = todo.pop()
            if current in classes and current not in out:
                out.append(current)
                todo += classes[current][1]
        return out

    shared: dict[str, list[str]] = {}
    for name in classes:
        files_of: dict[str, set[str]] = {}
        for cls in lineage(name):
            for attr in classes[cls][2]:
                files_of.setdefault(attr, set()).add(classes[cls][0])
        bad = [f"{attr} ({', '.join(sorted(f))})" for attr, f in sorted(files_of.items()) if len(f) > 1]
        if bad:
            shared[name] = bad
    return shared


def test_no_private_attribute_is_shared_across_files():
    """A class's `_name` state lives in one file: what a mixin or base in another file needs gets a public face
    (the gallery's search columns are `MetadataStore.columns()`, not a `_columns` three mixins shared)."""
    assert not private_attributes_shared_across_files(package_files())


def test_the_private_attribute_check_sees_mixins_sharing_state(tmp_path):
    (tmp_path / "reid_lite").mkdir()
    (tmp_path / "reid_lite" / "a.py").write_text("class Search:\n    def f(self):\n        return self._cache\n")
    (tmp_path / "reid_lite" / "b.py").write_text("class Gallery(Search):\n    def g(self):\n        self._cache = 1\n")
    files = sorted((tmp_path / "reid_lite").glob("*.py"))
    assert private_attributes_shared_across_files(files, tmp_path) == {
        "Gallery": ["_cache (reid_lite/a.py, reid_lite/b.py)"]}


#: What the gallery's operations may take from `index/storage.py`: its errors and the types of the storage
#: interface; the directory layout itself (CURRENT, gen-N folders, segments, the lock) stays behind
#: `DirectoryStorage`, so that another backend is another `GalleryStorage` class.
STORAGE_NAMES_FOR_OPERATIONS = {"FingerprintMismatch", "GalleryCorrupt", "GalleryError", "GalleryLocked",
                                "StageCallback", "StagedGeneration"}


@pytest.mark.parametrize("module", ["writes.py", "querying.py", "calibration.py", "embedding.py"])
def test_gallery_operations_reach_the_directory_through_the_storage_interface(module):
    path = PACKAGE / "index" / module
    taken = {a.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(n, ast.ImportFrom) and n.module == "storage" and n.level == 1 for a in n.names}
    assert taken <= STORAGE_NAMES_FOR_OPERATIONS, taken - STORAGE_NAMES_FOR_OPERATIONS
