"""The module layout the README describes, read from the code: imports point down.

Every import statement of the project (at module level and inside functions) is parsed; the
project's own modules form a graph that must have no cycle, no module may import an entry script
(entry scripts never import each other, and the core never imports one), and the core must not
load gradio or torch at import time where a `--help` would pay for it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

ENTRY_SCRIPTS = {"finetune", "finetune_4bit", "finetune_chat", "generate", "chat", "train_web"}


def project_modules() -> dict[str, str]:
    """{module name: path} for the repository root's modules and the tools/ scripts."""
    found = {}
    for folder in (ROOT, os.path.join(ROOT, "tools"), os.path.join(ROOT, "tools", "vicuna.cpp")):
        for name in os.listdir(folder):
            if name.endswith(".py"):
                found[name[:-3]] = os.path.join(folder, name)
    return found


def imports_of(path: str, names: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in its code."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out & names


@pytest.fixture(scope="module")
def graph():
    modules = project_modules()
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def tools_scripts() -> set[str]:
    return {n[:-3] for n in os.listdir(os.path.join(ROOT, "tools")) if n.endswith(".py")} | {
        "bench_cpu", "gen_unicode_tables", "train_float_reference", "rotate_float_reference"}


def test_no_import_cycle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_module_imports_an_entry_script(graph):
    entries = ENTRY_SCRIPTS | tools_scripts()
    offenders = {f"{m} imports {sorted(deps & entries)}" for m, deps in graph.items() if deps & entries}
    assert not offenders, sorted(offenders)


def test_the_graph_is_what_the_readme_says(graph):
    """A few edges that matter, so the parse above is known to see imports at all."""
    assert "train" in graph["train_args"] and "models" in graph["train"] and "prompt" in graph["train"]
    assert "errors" in graph["models"] and "errors" in graph["prompt"]
    assert not graph["errors"], graph["errors"]  # the bottom of the graph


@pytest.mark.parametrize("script", ["finetune.py", "generate.py", "chat.py", "train_web.py"])
def test_help_loads_no_heavy_library(script):
    code = ("import runpy, sys\n"
            f"sys.argv = [{script!r}, '--help']\n"
            "try:\n"
            f"    runpy.run_path({script!r}, run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "heavy = sorted(m for m in ('gradio', 'torch', 'transformers', 'peft') if m in sys.modules)\n"
            "sys.stderr.write('HEAVY=' + ','.join(heavy))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip().endswith("HEAVY="), proc.stderr[-500:]
