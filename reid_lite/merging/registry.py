"""The registry of token-reduction methods: one `MergeMethod` declaration per method.

Everything that lists methods (schedules and the GFLOPs solver, `merge_cfg`, the evaluator's
`--compare`, the benchmark, the torchreid factory names, the gallery fingerprint) loops over this
registry, so a method is one file: its reducer class and one `register_method(MergeMethod(...))`.

A method may live outside the package: list its file (or module) in `MERGE.PLUGINS`; `load_cfg`
imports it before it reads the config's other keys, so `MERGE.<NAME>.<KEY>` overrides of a plugin's
options work in YAML files and on the command line, and an unknown key is still an error.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yacs.config import CfgNode

from .base import TokenReducer
from .knobs import R_KNOB, BudgetKnob
from .settings import MERGE_DEFAULTS

#: builder(MERGE section, reducible depth, {0-based block: r} or None) -> {0-based block: reducer}
Builder = Callable[[CfgNode, int, "dict[int, int] | None"], "dict[int, TokenReducer]"]


@dataclass(frozen=True)
class MergeMethod:
    """One reduction method.

    name: the MERGE.METHOD value (lower case). build: MERGE section, depth, r schedule -> reducers.
    options: defaults of the method's own config node MERGE.<NAME> (empty: no node).
    uses_r: the method reads MERGE.R / R_LIST / LAYERS (the builder then gets the per-block r).
    gflops_knob: the knob MERGE.TARGET_GFLOPS (and `--budget`) turns to meet a GFLOPs budget: 'r' (merges
        over MERGE.LAYERS, needs uses_r), a `BudgetKnob` of the method's own options, or None (no budget).
    prop_attn: whether MERGE.PROP_ATTN applies (EViT's paper has no size bias).
    identity: the options that change features, for the gallery fingerprint (None: all of them).
    learned: the reducers hold learned parameters (nn.Modules saved in the model's state dict) that must be
        trained or loaded before the method means anything (DTEM); training-free methods: False.
    summary: one line for help texts.
    """

    name: str
    build: Builder
    options: Mapping[str, Any] = field(default_factory=dict)
    uses_r: bool = False
    gflops_knob: str | BudgetKnob | None = None
    prop_attn: bool = True
    identity: tuple[str, ...] | None = None
    learned: bool = False
    summary: str = ""

    @property
    def budget_knob(self) -> BudgetKnob | None:
        """The declared knob as a `BudgetKnob` ('r' is `knobs.R_KNOB`), or None."""
        return R_KNOB if self.gflops_knob == "r" else self.gflops_knob

    @property
    def node(self) -> str:
        """Name of the method's config node under MERGE (upper case)."""
        return self.name.upper()

    def identifying_options(self, merge: CfgNode) -> dict[str, Any]:
        """The options of MERGE.<NAME> that change features, JSON-ready."""
        if not self.options:
            return {}
        keys = self.identity if self.identity is not None else tuple(merge[self.node].keys())
        return {k: _plain(merge[self.node][k]) for k in keys}


_METHODS: dict[str, MergeMethod] = {}


def register_method(method: MergeMethod, replace: bool = False) -> MergeMethod:
    """Add `method` to the registry (its MERGE.<NAME> node is then part of `merge_section`); returns it.

    A name already taken raises ValueError unless `replace`. Option names must be upper case and may
    not collide with MERGE's own keys (METHOD, R, LAYERS, ...).
    """
    name = method.name
    if not name or name != name.lower() or not name.replace("_", "").isalnum() or not name[0].isalpha():
        raise ValueError(f"method name {name!r} must be lower case letters, digits and '_', starting with a letter")
    if name in _METHODS and not replace:
        raise ValueError(f"merging method {name!r} is already registered")
    if method.gflops_knob not in (None, "r") and not isinstance(method.gflops_knob, BudgetKnob):
        raise ValueError(f"{name}: gflops_knob must be 'r', a BudgetKnob or None, got {method.gflops_knob!r}")
    if method.gflops_knob == "r" and not method.uses_r:
        raise ValueError(f"{name}: a GFLOPs target is met through r, so gflops_knob='r' needs uses_r=True")
    bad = [k for k in method.options if k != k.upper()]
    if bad:
        raise ValueError(f"{name}: option names must be upper case, got {bad}")
    unknown = [k for k in method.identity or () if k not in method.options]
    if unknown:
        raise ValueError(f"{name}: identity names options it does not declare: {unknown}")
    if method.node in MERGE_DEFAULTS:
        raise ValueError(f"MERGE.{method.node} is one of MERGE's own keys; a method cannot use that name")
    _METHODS[name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method and its config node (for tests and interactive sessions); built-ins included."""
    del _METHODS[name]


def merge_section() -> CfgNode:
    """A fresh MERGE section: its own keys (`settings.MERGE_DEFAULTS`) and, in registration order, the option
    node MERGE.<NAME> of every registered method that declares options."""
    section = CfgNode(dict(MERGE_DEFAULTS))
    for method in _METHODS.values():
        if method.options:
            section[method.node] = CfgNode(dict(method.options))
    return section.clone()  # a deep copy: the registry's option defaults stay untouched


def get_method(name: str) -> MergeMethod:
    """The registered method called `name` (case-insensitive); ValueError naming the choices otherwise."""
    method = _METHODS.get(str(name).lower())
    if method is None:
        raise ValueError(f"unknown MERGE.METHOD {name!r}; choose one of {', '.join(method_names())} "
                         "(methods from your own files: list them in MERGE.PLUGINS)")
    return method


def method_of(merge: CfgNode) -> MergeMethod:
    """The method a MERGE section names, its MERGE.PLUGINS imported first (`load_plugins`, once per entry).

    The one entry point for a section: a section need not come from `load_cfg` (a gallery's stored config,
    a section built in code), so every use of one looks its method up here.
    """
    load_plugins(list(merge.get("PLUGINS", [])))
    return get_method(merge.METHOD)


def method_names() -> list[str]:
    """Registered method names, in registration order ('none' first)."""
    return list(_METHODS)


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """'none,tome,stm' -> ['none', 'tome', 'stm'], each checked against the registry; 'all': every method."""
    names = [m.strip().lower() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    if "all" in names and "all" not in _METHODS:
        names = list(dict.fromkeys(n for m in names for n in (method_names() if m == "all" else [m])))
    bad = [m for m in names if m not in _METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(method_names())} "
                         "(methods from your own files: list them in MERGE.PLUGINS)")
    return names


def option_key(merge: CfgNode, name: str) -> tuple[CfgNode, str]:
    """The MERGE node and key of a keyword option: `r`, `layers`, ... or `<method>_<key>` (`stm_coords`).

    Raises KeyError naming the option when it is not a leaf of the MERGE section.
    """
    key = name.upper()
    for method in sorted(_METHODS.values(), key=lambda m: -len(m.node)):  # longest prefix first
        prefix = method.node + "_"
        if key.startswith(prefix) and method.node in merge and key[len(prefix):] in merge[method.node]:
            return merge[method.node], key[len(prefix):]
    if key in merge and not isinstance(merge[key], CfgNode) and key != "METHOD":
        return merge, key
    raise KeyError(f"unknown merging option {name!r}; options are {', '.join(option_names(merge))}")


def option_names(merge: CfgNode) -> list[str]:
    """Every keyword option `option_key` accepts, lower case."""
    names = [k.lower() for k, v in merge.items() if not isinstance(v, CfgNode) and k != "METHOD"]
    for method in _METHODS.values():
        if method.node in merge:
            names += [f"{method.name}_{k.lower()}" for k in merge[method.node]]
    return names


def method_fingerprint(merge: CfgNode, r_solved: int | None = None,
                       solved: dict[str, Any] | None = None) -> dict[str, Any]:
    """What about the MERGE section changes features: the method, its schedule, all its identifying options.

    Built-in methods keep the layout galleries already store (schedule keys for every method but 'none').
    `solved`: the setting a GFLOPs budget chose when it is not a constant r (`r_solved`), e.g.
    {'MERGE.EVIT.KEEP_RATE': 0.73}; recorded under 'solved' only then.
    """
    method = method_of(merge)
    out: dict[str, Any] = {"method": method.name}
    if method.name == "none":
        return out
    out.update(r=int(merge.R), r_list=list(merge.R_LIST), layers=list(merge.LAYERS),
               target_gflops=float(merge.TARGET_GFLOPS), prop_attn=bool(merge.PROP_ATTN), r_solved=r_solved)
    if method.options:
        out[method.name] = method.identifying_options(merge)
    if solved is not None:
        out["solved"] = {k: _plain(v) for k, v in solved.items()}
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------------------- plugins
_LOADED: dict[str, str] = {}  # plugin entry (resolved path or module name) -> module name


def resolve_plugin(entry: str) -> str:
    """A MERGE.PLUGINS entry as it is stored: an existing .py file as an absolute path, else a module name.

    Raises ValueError naming the entry when a path does not exist or a name is not a module name.
    """
    entry = str(entry).strip()
    if entry.endswith(".py") or "/" in entry or "\\" in entry:
        path = Path(entry).expanduser()
        if not path.is_file() or path.suffix != ".py":
            raise ValueError(f"MERGE.PLUGINS: {entry!r} is not an existing .py file")
        return str(path.resolve())
    if not entry or not all(part.isidentifier() for part in entry.split(".")):
        raise ValueError(f"MERGE.PLUGINS: {entry!r} is neither a .py file nor a module name")
    return entry


class PluginError(ValueError):
    """A MERGE.PLUGINS entry failed to import (a syntax error, or an exception raised while it ran); the
    message names the file and line, the original exception is its `__cause__`."""


def _plugin_error(entry: str, err: BaseException) -> PluginError:
    """PluginError naming the plugin's file and line where `err` arose (a syntax error's own location, else
    the deepest traceback frame in the plugin's file, else the deepest frame outside importlib)."""
    if isinstance(err, SyntaxError) and err.filename:
        where = f"{err.filename}, line {err.lineno}"
        what = f"SyntaxError: {err.msg}"
    else:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith("<frozen")]
        own = [f for f in frames if f.filename == entry] or frames
        where = f"{own[-1].filename}, line {own[-1].lineno}" if own else entry
        what = f"{type(err).__name__}: {err}"
    return PluginError(f"MERGE.PLUGINS: {entry!r} failed to import ({where}): {what}")


def load_plugins(entries: Sequence[str]) -> list[str]:
    """Import each plugin (a .py file or a module name) once, so that it registers its methods.

    Returns the entries as resolved by `resolve_plugin`. A file is imported as module
    `reid_lite_plugin_<stem>_<hash of its path>`. An exception inside a plugin (syntax error included) is
    raised as PluginError (a ValueError) naming the file and line, chained to the original.
    """
    resolved = [resolve_plugin(e) for e in entries]
    for entry in resolved:
        if entry in _LOADED:
            continue
        if entry.endswith(".py"):
            digest = hashlib.sha1(entry.encode()).hexdigest()[:8]
            name = f"reid_lite_plugin_{Path(entry).stem}_{digest}"
            spec = importlib.util.spec_from_file_location(name, entry)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # registered first: dataclasses and pickling look modules up
            try:
                spec.loader.exec_module(module)
            except Exception as err:
                del sys.modules[name]
                raise _plugin_error(entry, err) from err
            except BaseException:  # KeyboardInterrupt, SystemExit: not the plugin's error to report
                del sys.modules[name]
                raise
        else:
            try:
                name = importlib.import_module(entry).__name__
            except ModuleNotFoundError as e:
                if e.name and entry.startswith(e.name):
                    raise ValueError(f"MERGE.PLUGINS: no module named {entry!r}") from None
                raise _plugin_error(entry, e) from e
            except Exception as err:
                raise _plugin_error(entry, err) from err
        _LOADED[entry] = name
    return resolved


def forget_plugin(entry: str) -> None:
    """Let `load_plugins` import `entry` again (tests that register and unregister a plugin's methods)."""
    name = _LOADED.pop(resolve_plugin(entry), None)
    if name and name.startswith("reid_lite_plugin_"):
        sys.modules.pop(name, None)


def build_none(merge: CfgNode, depth: int, rs: dict[int, int] | None) -> dict[int, TokenReducer]:
    """No reduction: TransReID as published."""
    return {}


register_method(MergeMethod("none", build_none, summary="TransReID as published (no token reduction)"))
