"""docs/troubleshooting.md lists every error message a user can meet. The test walks the AST of reid_lite/ and
tools/ for the places that build an error with a literal or f-string message (an exception of a built-in or the
project's own class, raised or returned; `cli_error(...)`, `parser.error(...)`, the HTTP server's
`_error(status, ...)` and local helpers that raise their argument; a message bound to a name first, or joined
from lines; the text that `*_reason` / `*_hint` functions return for messages), renders each message with `…`
for its variable parts, takes its first few words (its key) and asserts the page holds that text. A message no
user can trigger (an internal invariant; a library caller's mistakes are listed on the page) is in INTERNAL with
a one-line reason instead."""

from __future__ import annotations

import ast
import builtins
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "troubleshooting.md"
SOURCES = ("reid_lite", "tools")

#: How many words of a message (not counting its variable parts) make its key.
KEY_WORDS = 6

#: Not raised as exceptions but reported to the user all the same.
REPORTING_CALLS = {"cli_error"}

#: Functions whose returned text becomes (part of) an error message elsewhere, by name.
MESSAGE_FUNCTIONS = re.compile(r"_(reason|hint)$")

#: Messages a user cannot meet, by key, each with the reason. Reviewed: keep it short.
INTERNAL: dict[str, str] = {
    "module 'reid_lite' has no attribute": "Python's own wording for a misspelled import; nothing to fix in a config",
    "module … has no attribute": "torchreid adapter's lazy attributes: Python's own wording for a misspelled import",
    "jpeg encoding failed": "Pillow failed to encode an in-memory synthetic image: a bug, not input",
    "vector segments in … are not in": "storage invariant the writer maintains; a damaged gallery fails its "
                                        "checksums first",
    "an indexed id has no stored": "storage invariant: the checksummed index and vector files agree",
    "records need their content sha256": "internal writer invariant: every record is hashed before writing",
    "index removed … of … ids; metadata and": "internal invariant: metadata and index are removed from together",
    "a requested id has no stored": "PostgreSQL store invariant: ids come from the same transaction",
    "a postgresql gallery keeps no vector": "never called: a PostgreSQL gallery writes no IVF-PQ re-ranking segments",
    "unexpected binary copy of …-d vectors": "PostgreSQL COPY protocol invariant (psycopg's wire format)",
    "a stored vector is not …-d": "PostgreSQL store invariant: the column's dimension is fixed by its type",
    "resuming inside an epoch needs the": "library invariant: train() always builds that loader itself",
    "rank … outside a world of … processes": "distributed sampler: rank and world size come from torchrun",
    "got … tracklets, … entries and … features": "video ingest invariant: one entry and feature per tracklet",
    "the detector returned … results for … frames": "video pipeline invariant: the detector answers per frame",
    "the embedder returned … features for … crops": "video pipeline invariant: the embedder answers per crop",
}


@dataclass(frozen=True)
class ErrorSite:
    """One place in the code that builds a user-visible error message."""

    file: str
    line: int
    kind: str
    message: str  # the message with `…` for each variable part

    @property
    def key(self) -> str | None:
        """The message's first KEY_WORDS words (lower case), or None when it has no words of its own."""
        return message_key(self.message)


def normalise(text: str) -> str:
    """Lower case, one space for any run of whitespace, markdown's escaped `|` unescaped."""
    return re.sub(r"\s+", " ", text.replace("\\|", "|")).strip().lower()


def message_key(message: str) -> str | None:
    """The message's leading text: leading variable parts dropped, then the shortest prefix holding KEY_WORDS
    words (variable parts do not count), trailing punctuation and variable parts dropped."""
    text = re.sub(r"^[\s…:;,.'\"()]+", "", normalise(message))
    words, counted = [], 0
    for word in text.split(" "):
        words.append(word)
        counted += bool(re.search(r"[^\W_]", word.replace("…", "")))
        if counted == KEY_WORDS:
            break
    key = " ".join(words).rstrip(" …:;,(.")
    return key if re.search(r"[^\W_]", key) else None


def render(node: ast.expr, literals: dict[str, list[ast.expr]]) -> list[str] | None:
    """The message(s) an expression builds, `…` for each variable part; None when it is not a literal string, an
    f-string, a `+` of those, or a name bound to one of them in the same function."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return ["".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = render(node.left, literals), render(node.right, literals)
        if left is None and right is None:
            return None
        return [a + b for a in (left or ["…"]) for b in (right or ["…"])]
    if isinstance(node, ast.Name) and node.id in literals:
        out = [m for value in literals[node.id] for m in (render(value, {}) or [])]
        return out or None
    if isinstance(node, ast.List) and node.elts:  # lines of a message joined later: its first line leads
        return render(node.elts[0], literals)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "join"
            and isinstance(node.func.value, ast.Constant) and len(node.args) == 1):
        return render(node.args[0], literals)
    return None


def exception_names(trees: list[ast.Module]) -> set[str]:
    """Built-in exception classes, the web and argparse ones the code raises, and the project's own classes
    derived from any of them."""
    names = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
    names |= {"HTTPException", "ArgumentTypeError"}
    classes = [(c.name, {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in c.bases})
               for t in trees for c in ast.walk(t) if isinstance(c, ast.ClassDef)]
    grew = True
    while grew:
        before = len(names)
        names |= {name for name, bases in classes if bases & names}
        grew = len(names) > before
    return names


def _call_name(call: ast.Call) -> tuple[str, str | None]:
    """(function name, the receiver's name for a method call)."""
    func = call.func
    if isinstance(func, ast.Name):
        return func.id, None
    if isinstance(func, ast.Attribute):
        return func.attr, func.value.id if isinstance(func.value, ast.Name) else None
    return "", None


def raising_helpers(trees: list[ast.Module], exceptions: set[str]) -> dict[str, int]:
    """Functions that raise an exception with one of their parameters as its message (e.g. a local
    `refuse(msg)`), by name, with that parameter's position: their callers' literal messages count."""
    out = {}
    for tree in trees:
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            params = [a.arg for a in func.args.args]
            for node in ast.walk(func):
                if (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args
                        and _call_name(node.exc)[0] in exceptions and isinstance(node.exc.args[0], ast.Name)
                        and node.exc.args[0].id in params and not func.name.startswith("__")):
                    out[func.name] = params.index(node.exc.args[0].id)
    return out


def _message_arg(call: ast.Call, name: str, receiver: str | None, exceptions: set[str],
                 helpers: dict[str, int]) -> ast.expr | None:
    """The argument holding the message, when `call` reports an error; else None."""
    if name == "HTTPException" or (name == "_error" and receiver is None):
        args = call.args[1:]  # (status, message)
    elif name in helpers and receiver is None:
        args = call.args[helpers[name]:]
    elif name in exceptions or name in REPORTING_CALLS or (name == "error" and receiver and "p" in receiver
                                                            and receiver != "logger"):
        args = call.args
    else:
        return None
    return args[0] if args else None


def _string_bindings(func: ast.AST) -> dict[str, list[ast.expr]]:
    """Names assigned a literal or f-string message in a function (a message built before it is raised)."""
    out: dict[str, list[ast.expr]] = {}
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if render(node.value, {}) is not None:
                out.setdefault(node.targets[0].id, []).append(node.value)
    return out


def error_sites(root: Path = ROOT) -> list[ErrorSite]:
    """Every place under SOURCES that builds an error message from literal text."""
    paths = sorted(p for d in SOURCES for p in (root / d).rglob("*.py"))
    trees = {p: ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for p in paths}
    exceptions = exception_names(list(trees.values()))
    helpers = raising_helpers(list(trees.values()), exceptions)
    sites = []
    for path, tree in trees.items():
        scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        bindings = {}
        for scope in scopes:  # outer functions first, so a nested function's own bindings win
            names = _string_bindings(scope)
            bindings.update({id(node): names for node in ast.walk(scope)})
        for scope in scopes:
            if MESSAGE_FUNCTIONS.search(scope.name):
                returns = [n for n in ast.walk(scope) if isinstance(n, ast.Return) and n.value is not None]
                sites += [ErrorSite(str(path.relative_to(root)), n.lineno, scope.name, m)
                          for n in returns for m in render(n.value, bindings.get(id(n), {})) or []]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name, receiver = _call_name(node)
            arg = _message_arg(node, name, receiver, exceptions, helpers)
            messages = render(arg, bindings.get(id(node), {})) if arg is not None else None
            sites += [ErrorSite(str(path.relative_to(root)), node.lineno, name, m) for m in messages or []]
    return sites


def undocumented(sites: list[ErrorSite], doc: str, internal: dict[str, str]) -> list[ErrorSite]:
    """The sites whose key is neither on the page nor allowed as internal."""
    page = normalise(doc)
    return [s for s in sites if s.key and s.key not in internal and not on_page(s.key, page)]


def on_page(key: str, page: str) -> bool:
    """Whether the normalised page holds `key` ending where a word ends (the key `… does not match the model`
    is not the page's `does not match the model's`)."""
    return re.search(re.escape(key) + (r"(?![\w'])" if key[-1].isalnum() else ""), page) is not None


def test_every_user_error_message_is_in_troubleshooting():
    sites = error_sites()
    assert len(sites) > 300  # the walk found the code's messages
    missing = undocumented(sites, DOC.read_text(encoding="utf-8"), INTERNAL)
    assert not missing, (
        "error messages missing from docs/troubleshooting.md (add the message, `…` for its variable parts, and "
        "its fix; or, if no user can meet it, add its key to INTERNAL with the reason):\n"
        + "\n".join(f"{s.file}:{s.line}: {s.key!r}  <- {s.message}" for s in missing))


def test_every_internal_entry_is_a_live_message_with_a_reason():
    keys = {s.key for s in error_sites()}
    stale = [k for k in INTERNAL if k not in keys]
    assert not stale, f"INTERNAL keys that no message has any more (remove them): {stale}"
    assert all(len(reason) > 20 for reason in INTERNAL.values())


def test_the_walk_finds_raised_returned_and_reported_messages(tmp_path):
    (tmp_path / "reid_lite").mkdir()
    (tmp_path / "tools").mkdir()
    (tmp_path / "reid_lite" / "m.py").write_text(
        "class ShelfError(ValueError):\n    pass\n\n\n"
        "def _dust_reason():\n    return 'the shelf is dusty'\n\n\n"
        "def f(x, p):\n"
        "    if x:\n        raise ShelfError(f'{x} is not on the shelf: put it back')\n"
        "    msg = f'the shelf holds {x} books, at most {p}'\n"
        "    if p:\n        raise ValueError(msg)\n"
        "    lines = [f'{x} does not match the shelf:', '  more']\n"
        "    if p > 1:\n        raise ShelfError('\\n'.join(lines))\n"
        "    p.error('--shelf must be positive')\n"
        "    def refuse(m):\n        raise ValueError(m)\n"
        "    refuse('the shelf is closed')\n"
        "    return KeyError('unknown book ' + x)\n")
    (tmp_path / "tools" / "t.py").write_text("def g(e):\n    return cli_error(e)\n")  # no literal: nothing
    sites = error_sites(tmp_path)
    assert sorted(s.key for s in sites) == [
        "--shelf must be positive", "does not match the shelf", "is not on the shelf: put",
        "the shelf holds … books, at most", "the shelf is closed", "the shelf is dusty", "unknown book"]
    doc = ("| `… is not on the shelf: put it back` | fix |\n`--shelf must be positive`, `unknown book …`,\n"
           "`the shelf is dusty`, `… does not match the shelf's`")
    missing = sorted(s.key for s in undocumented(sites, doc, {}))
    assert missing == ["does not match the shelf", "the shelf holds … books, at most", "the shelf is closed"]
    allowed = dict.fromkeys(missing, "reason")
    assert undocumented(sites, doc, allowed) == []
