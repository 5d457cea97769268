"""The documentation's commands and names are real: every shell command shown in README.md and docs/ is run by
.ci/run or by a test (through `doc_command`), or carries a marker saying what the user must supply; the README's
library snippet runs on the demo model; every name on an API page has a docstring; the version is one."""

from __future__ import annotations

import importlib
import inspect
import re

import numpy as np
import pytest
from doc_commands import REPO, DocCommand, commands_in, doc_command, documented_commands, normalise, strip_comment
from PIL import Image

import reid_lite
from reid_lite.index import cli as gallery_cli

TESTS = REPO / "tests"


def ci_commands() -> list[str]:
    """The commands .ci/run runs (continuations joined; each side of `&&` and `||` on its own)."""
    text = (REPO / ".ci" / "run").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        code, _ = strip_comment(line.strip())
        out += [normalise(part) for part in re.split(r"&&|\|\|", code) if part.strip()]
    return out


def claimed_prefixes() -> set[str]:
    """The prefixes tests pass to `doc_command`: each such test runs the command it gets."""
    pattern = re.compile(r"""doc_command\(\s*(["'])(.+?)\1""")
    return {m.group(2) for f in TESTS.glob("test_*.py") for m in pattern.finditer(f.read_text())}


def unrun(commands: list[DocCommand], ci: list[str], prefixes: set[str]) -> list[DocCommand]:
    """The unmarked commands that neither CI (a line starting with the command: CI may add KEY VALUE
    overrides such as OUTPUT_DIR) nor a test runs."""
    return [c for c in commands if c.marker is None
            and not any(line.startswith(c.text) for line in ci)
            and not any(c.text.startswith(p) for p in prefixes)]


def test_every_documented_command_is_run_or_marked():
    commands = documented_commands()
    assert len(commands) > 30  # the parser found the docs' blocks
    missing = unrun(commands, ci_commands(), claimed_prefixes())
    assert not missing, "documented commands that no test or CI step runs (run them, or mark the block " \
        "'# needs your data: ...'):\n" + "\n".join(f"{c.file}:{c.line}: {c.text}" for c in missing)


def test_the_check_fails_on_an_unmarked_command_that_nothing_runs():
    page = """
```bash
# needs your data: a checkpoint
python tools/test.py --config x.yml TEST.WEIGHT w.pth
```
```bash
python tools/covered.py --a 1 \\
    --b "x # not a comment"   # a comment
python tools/nobody_runs_this.py
python tools/heavy.py   # long run: an hour
```
```python
print("python code is not a shell command")
```
"""
    commands = commands_in(page, "page.md")
    assert [(c.text, c.marker) for c in commands] == [
        ("python tools/test.py --config x.yml TEST.WEIGHT w.pth", "needs your data"),
        ('python tools/covered.py --a 1 --b "x # not a comment"', None),
        ("python tools/nobody_runs_this.py", None),
        ("python tools/heavy.py", "long run"),
    ]
    ci = ['python tools/covered.py --a 1 --b "x # not a comment" OUTPUT_DIR out']
    assert [c.text for c in unrun(commands, ci, set())] == ["python tools/nobody_runs_this.py"]
    assert unrun(commands, ci, {"python tools/nobody"}) == []


def test_ci_commands_are_read_as_ci_runs_them():
    ci = ci_commands()
    assert "pip install -e '.[test,docs]'" in ci  # `python -m pip` compares as `pip`
    assert "mkdocs build --strict" in ci
    assert any(line.startswith("python -m pytest -q -rs tests") for line in ci)  # env assignment dropped
    assert "apt-get install -y chromium chromium-driver" in ci  # one side of `&&`


def test_reid_gallery_version(capsys):
    args = doc_command("reid-gallery --version").split()[1:]
    with pytest.raises(SystemExit) as exit_:
        gallery_cli.main(args)
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"reid-gallery {reid_lite.__version__} (reid_lite)"


def test_one_version_everywhere():
    assert re.fullmatch(r"\d+\.\d+\.\d+", reid_lite.__version__)
    citation = (REPO / "CITATION.cff").read_text()
    assert f"\nversion: {reid_lite.__version__}\n" in citation
    assert "version=VERSION" in (REPO / "setup.py").read_text()  # read from reid_lite/__init__.py


def readme_python_block() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "the README shows one library snippet"
    return blocks[0]


def test_readme_library_snippet_runs_on_the_demo_model(tmp_path, monkeypatch):
    code = readme_python_block()
    rng = np.random.default_rng(0)
    for name in ("crop_a.jpg", "crop_b.jpg"):  # the user's crops
        Image.fromarray(rng.integers(0, 255, (128, 64, 3), dtype=np.uint8)).save(tmp_path / name)
        code = code.replace(f'"{name}"', repr(str(tmp_path / name)))
    monkeypatch.chdir(REPO)  # configs/demo_synthetic.yml and its weights path are relative to the checkout
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (the README's own snippet)
    features = np.asarray(scope["features"])
    assert features.shape == (2, 320)  # the comment in the snippet
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)


def api_names() -> list[tuple[str, bool]]:
    """The objects the API pages render (`::: dotted.name`), each with whether its members are rendered too
    (not under `members: false`)."""
    entry = re.compile(r"^::: ([\w.]+)\n((?:[ \t]+\S.*\n)*)", re.M)
    return [(m.group(1), "members: false" not in m.group(2)) for f in sorted((REPO / "docs" / "api").glob("*.md"))
            for m in entry.finditer(f.read_text())]


def resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_every_name_on_the_api_pages_has_a_docstring():
    names = api_names()
    assert {"reid_lite.merging.patch", "reid_lite.metrics.evaluate_rank", "reid_lite.index.Gallery"} <= \
        {name for name, _ in names}
    assert ("reid_lite.merging.ToMe", False) in names  # `members: false` read
    undocumented = []
    for name, members in names:
        obj = resolve(name)
        if not inspect.getdoc(obj):
            undocumented.append(name)
        if members and inspect.isclass(obj):  # its own public methods, as the page lists them
            undocumented += [f"{name}.{k}" for k, v in vars(obj).items() if not k.startswith("_")
                             and inspect.isfunction(v) and not v.__doc__]
    assert not undocumented, f"API names without a docstring: {undocumented}"


def test_docs_pages_are_in_the_nav():
    """A page left out of mkdocs.yml's nav is unreachable from the site (the strict build only warns)."""
    nav = (REPO / "mkdocs.yml").read_text()
    pages = [p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")]
    assert pages and not [p for p in pages if f": {p}" not in nav]


def test_no_reference_to_the_folder_outside_the_repository():
    roots = [REPO / "reid_lite", REPO / "tools", REPO / "configs", REPO / "docs", REPO / "examples"]
    files = [REPO / "README.md", REPO / "setup.py", *(f for r in roots for f in r.rglob("*")
                                                     if f.suffix in {".py", ".md", ".yml"})]
    hits = [f"{f.relative_to(REPO)}" for f in files if "../shared" in f.read_text(errors="replace")]
    assert not hits



def test_readme_links_resolve():
    """The README is read on the repository's page, not built by MkDocs: its relative links are checked here."""
    text = (REPO / "README.md").read_text()
    links = [m.group(1).split("#")[0] for m in re.finditer(r"\]\(([^)\s]+)\)", text)]
    local = [link for link in links if link and "://" not in link]
    assert len(local) > 10
    assert not [link for link in local if not (REPO / link).exists()]


def test_docstrings_use_markdown_not_sphinx_roles():
    """The API pages render docstrings as Markdown: a Sphinx role such as :meth:`open` (or `~x.y`) shows literally."""
    role = re.compile(r":(meth|func|class|data|attr|mod|exc|obj):`|`~")  # a role, or its `~name` shorthand
    bad = [f"{path.relative_to(REPO)}:{number}" for path in sorted((REPO / "reid_lite").rglob("*.py"))
           for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if role.search(line)]
    assert not bad, f"Sphinx roles in docstrings (write `name` instead): {bad}"
