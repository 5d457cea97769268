"""The tools' shared arguments (`reid_lite.cli`): one definition of --config, --threads, --system-malloc and the KEY
VALUE overrides; the malloc setting they apply (`reid_lite.utils.malloc`)."""

from __future__ import annotations

import ast
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reid_lite.cli import (
    CONFIG_HELP,
    add_config_arg,
    add_malloc_arg,
    add_opts_arg,
    add_threads_arg,
    set_threads,
    tool_parser,
)

ROOT = Path(__file__).resolve().parent.parent
SHARED = {"--config", "--config_file", "--threads", "--system-malloc", "opts"}


def test_the_shared_arguments_parse_as_the_tools_expect():
    p = tool_parser("Summary line.\n\nMore text.", summary=True)
    add_config_arg(p, aliases=True)
    add_threads_arg(p)
    add_malloc_arg(p)
    add_opts_arg(p)
    args = p.parse_intermixed_args(["MODEL.DEVICE", "cpu", "--config_file", "a.yml", "--threads", "3"])
    assert (args.config, args.threads, args.opts, args.system_malloc) == ("a.yml", 3, ["MODEL.DEVICE", "cpu"], False)
    assert p.parse_intermixed_args(["--system-malloc"]).system_malloc
    assert p.description == "Summary line." and CONFIG_HELP in p.format_help()
    q = tool_parser("Doc.")
    add_config_arg(q, default="configs/x.yml")
    add_opts_arg(q, remainder=True)
    args = q.parse_args(["MODEL.NAME", "--weird-value"])  # REMAINDER keeps what follows, dashes included
    assert (args.config, args.opts) == ("configs/x.yml", ["MODEL.NAME", "--weird-value"])


def test_set_threads_sets_only_a_positive_count():
    before = torch.get_num_threads()
    try:
        set_threads(0)
        set_threads(None)
        assert torch.get_num_threads() == before
        set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_no_tool_defines_the_shared_arguments_itself():
    own = []
    for path in sorted((ROOT / "tools").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and first.value in SHARED:
                    own.append(f"{path.name} {first.value}")
    # bench_eval.py stays on reid_lite.metrics alone (its memory figures): its torch --threads is its own.
    assert own == ["bench_eval.py --threads"], own


# Allocates, fills and frees a 48 MiB tensor (above glibc's largest mmap threshold) in five rounds; prints the
# median of the minor page faults per round (a round may place the buffer anew once, e.g. after a thread's first
# allocation, and fault it in). In a child process: the malloc setting is process-wide and not undone.
_FAULTS = """
import resource, statistics, sys, torch
from reid_lite.cli import set_malloc
print(set_malloc(sys.argv[1] == "system"))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    torch.ones(48 << 18)
rounds = []
for _ in range(5):
    f0 = faults()
    torch.ones(48 << 18)
    rounds.append(faults() - f0)
print(statistics.median(rounds))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc setting applies to glibc only")
def test_retained_malloc_spares_each_large_buffer_its_page_faults():
    """The tools' default: a freed activation buffer is reused, not faulted back in page by page (12,288 pages)."""
    runs = {}
    for mode in ("system", "retain"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        applied, faults = out.stdout.split()
        runs[mode] = (applied, float(faults))
    assert runs["system"][0] == "False" and runs["system"][1] > 10_000, runs  # glibc mmaps and unmaps each one
    assert runs["retain"][0] == "True" and runs["retain"][1] < 500, runs
