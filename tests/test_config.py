"""Configuration: one `validate(cfg)` for every check of values, and MERGE.PLUGINS imported from one entry point
per way plugin names arrive (a config file and overrides, a MERGE section, keyword arguments)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from reid_lite.config import get_cfg, validate
from reid_lite.engine.trainer import check_training_cfg
from reid_lite.merging import merge_section, method_names, method_of, unregister_method
from reid_lite.merging.registry import forget_plugin

ROOT = Path(__file__).resolve().parent.parent

#: The functions that may call `load_plugins`: one per way plugin names arrive.
PLUGIN_ENTRY_POINTS = {("reid_lite/config.py", "load_config_plugins"), ("reid_lite/merging/registry.py", "method_of"),
                       ("reid_lite/merging/attach.py", "merge_cfg")}

PLUGIN = '''
from reid_lite.merging import MergeMethod, register_method
register_method(MergeMethod("noopplugin", lambda merge, depth, rs: {}, summary="test plugin: no reduction"))
'''


def test_validate_checks_the_test_size_for_testing_and_the_training_keys_for_training():
    cfg = get_cfg()
    cfg.merge_from_list(["INPUT.SIZE_TEST", [384, 192], "MODEL.NECK", "no"])
    with pytest.raises(ValueError, match=r"INPUT.SIZE_TEST \[384, 192\] differs"):
        validate(cfg)
    with pytest.raises(ValueError, match="MODEL.NECK 'no' is not supported"):
        validate(cfg, training=True)
    cfg.MODEL.NECK = "bnneck"
    validate(cfg, training=True)  # training checks its keys; the test size is checked on the model when it evaluates
    cfg.MODEL.NECK = "no"
    with pytest.raises(ValueError, match="MODEL.NECK 'no' is not supported"):
        check_training_cfg(cfg)  # the trainer's name for validate(cfg, training=True)


@pytest.fixture
def plugin_file(tmp_path) -> Path:
    path = tmp_path / "noop_plugin.py"
    path.write_text(PLUGIN)
    yield path
    if "noopplugin" in method_names():
        unregister_method("noopplugin")
    forget_plugin(str(path))


def test_a_merge_section_imports_its_plugins_when_its_method_is_looked_up(plugin_file):
    section = merge_section()
    section.PLUGINS, section.METHOD = [str(plugin_file)], "noopplugin"
    assert "noopplugin" not in method_names()
    assert method_of(section).name == "noopplugin"
    assert method_of(section) is method_of(section)  # imported once: the same registered method


def test_load_plugins_is_called_from_the_entry_points_only():
    calls = set()
    for path in sorted((ROOT / "reid_lite").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_plugins":
                        calls.add((str(path.relative_to(ROOT)), func.name))
    assert calls == PLUGIN_ENTRY_POINTS
