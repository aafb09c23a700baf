"""The copy test: a student copies a method script with the project modules it imports, so
those stay small (docs/core.md, "The layout"). Each budget goes red when it is crossed."""
import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("mergan_jtr", "mergan_ra", "dgr", "dgm", "ewc_fewshot")
COMMON_MAX, CLOSURE_MAX, SCRIPT_MAX = 900, 1200, 700  # lines
SCRIPT_BUDGET = {"dgm": SCRIPT_MAX, "ewc_fewshot": SCRIPT_MAX}


def lines(module):
    with open(os.path.join(ROOT, module + ".py")) as f:
        return len(f.read().splitlines())


def project_modules():
    return sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def imports(module):
    """The project modules `module` imports anywhere in its source (top level or inside a
    function: a lazy import is still an edge of the graph)."""
    with open(os.path.join(ROOT, module + ".py")) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names & set(project_modules())


def closure(script):
    """The project modules that `import <script>` loads, besides the script itself."""
    code = (f"import json, sys; sys.path.insert(0, {ROOT!r}); import {script}; "
            "print(json.dumps(sorted(m for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    return sorted(set(json.loads(out)) & set(project_modules()) - {script})


def test_common_is_small():
    assert lines("common") <= COMMON_MAX, f"common.py: {lines('common')} lines > {COMMON_MAX}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_what_a_copied_script_carries(script):
    carried = closure(script)
    total = sum(lines(m) for m in carried)
    assert "common" in carried  # the measurement sees imports at all
    assert total <= CLOSURE_MAX, f"import {script} loads {carried}: {total} lines"
    if script in SCRIPT_BUDGET:
        assert lines(script) <= SCRIPT_BUDGET[script], f"{script}.py: {lines(script)} lines"


def test_table2_is_loaded_only_for_lsun():
    for script in ("mergan_jtr", "mergan_ra", "dgr"):
        assert "mergan_lsun" not in closure(script)


def circles(graph):
    """The modules from which the import graph {module: imported} leads back to themselves."""
    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen
    return sorted(m for m in graph if m in reach(m))


def test_no_import_circle():
    graph = {m: imports(m) for m in project_modules()}
    # common.py stands below every script: what it imports (local_data, when asked for a
    # dataset it reads) imports no project module
    assert not [m for m in graph["common"] if graph[m]], f"common.py imports {graph['common']}"
    assert not circles(graph), f"import circle through {circles(graph)}"


def test_the_measures_see_what_they_guard(tmp_path, monkeypatch):
    """On a made-up layout: a lazy import is an edge, a circle is found, the closure and
    the line count are what they are."""
    for name, src in {"a": "import b\n", "b": "def f():\n    import a\n", "c": "x = 1\n"}.items():
        (tmp_path / f"{name}.py").write_text(src)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    graph = {m: imports(m) for m in project_modules()}
    assert graph == {"a": {"b"}, "b": {"a"}, "c": set()}
    assert circles(graph) == ["a", "b"]
    assert closure("a") == ["b"] and closure("c") == [] and lines("b") == 2
