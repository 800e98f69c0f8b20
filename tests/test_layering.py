"""Layering: the library ``ddetr_d2`` never imports the video add-on ``ddetr_video``; tests never import
``tools/*.py`` files (they run them as subprocesses or test the library function behind them)."""

import ast
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = os.path.join(REPO, "ddetr_d2")
TEST_DIRS = [os.path.join(REPO, "tests"), os.path.join(REPO, "video", "tests")]


def _python_files(root):
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def _imported_modules(path):
    """Every module name an ``import`` / ``from ... import`` statement of the file names (any depth)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_every_library_module_imports_without_the_video_add_on():
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys

        class NoVideoAddOn:
            def find_spec(self, name, path=None, target=None):
                if name == "ddetr_video" or name.startswith("ddetr_video."):
                    raise ImportError(f"{name} is made unimportable by test_layering")
                return None

        sys.meta_path.insert(0, NoVideoAddOn())
        import ddetr_d2

        failed, names = [], ["ddetr_d2"]
        for info in pkgutil.walk_packages(ddetr_d2.__path__, "ddetr_d2."):
            names.append(info.name)
            try:
                importlib.import_module(info.name)
            except Exception as e:
                failed.append(f"{info.name}: {type(e).__name__}: {e}")
        leaked = sorted(m for m in sys.modules if m == "ddetr_video" or m.startswith("ddetr_video."))
        print(" ".join(names))
        assert not failed, failed
        assert not leaked, leaked
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    imported = set(proc.stdout.split())
    expected = set()
    for path in _python_files(LIBRARY):  # every .py file is a module or a package's __init__
        parts = os.path.relpath(path, REPO)[: -len(".py")].split(os.sep)
        expected.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert expected <= imported, sorted(expected - imported)


def test_no_library_file_imports_the_video_add_on():
    offenders = []
    for path in _python_files(LIBRARY):
        for module in _imported_modules(path):
            if module == "ddetr_video" or module.startswith("ddetr_video."):
                offenders.append(f"{os.path.relpath(path, REPO)} imports {module}")
    assert not offenders, offenders


def _loads_a_tool_by_path(path):
    """Loader calls (importlib's ``spec_from_file_location`` / ``SourceFileLoader``, ``runpy.run_path``)
    in a file whose string literals name the tools/ folder, and ``import_module("tools...")`` calls."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    names_tools = any(s == "tools" or s.startswith(("tools/", "tools.")) or "/tools/" in s for s in strings)
    hits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        by_path = name in ("spec_from_file_location", "SourceFileLoader", "run_path") and names_tools
        first = node.args[0] if node.args else None
        by_name = (
            name in ("import_module", "run_module")
            and isinstance(first, ast.Constant)
            and str(first.value).startswith("tools")
        )
        if by_path or by_name:
            hits.append(f"{os.path.relpath(path, REPO)}:{node.lineno} {name}")
    return hits


def test_no_test_imports_a_tools_script_by_path():
    offenders = []
    for folder in TEST_DIRS:
        for path in _python_files(folder):
            if os.path.abspath(path) != os.path.abspath(__file__):
                offenders.extend(_loads_a_tool_by_path(path))
    assert not offenders, "run tools/*.py as subprocesses or test the library function: " + "; ".join(
        offenders
    )
