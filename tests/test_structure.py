"""Structure checks anyone can run: no import cycle among the package's modules, and each imports alone."""

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("memoir", "memoir_kernels")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports anywhere in its file (module level or inside functions)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([package] + ([base] if base else []))
            for alias in node.names:
                for candidate in (f"{base}.{alias.name}", base):
                    if candidate in known:
                        targets.add(candidate)
                        break
        elif isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names if alias.name in known}
    targets.discard(name)
    return {t for t in targets if t not in PACKAGES}  # a package's __init__ only re-exports


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items() if name not in PACKAGES}
    state: dict[str, str] = {}

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join(trail + [node, target]))
            if target not in state:
                visit(target, trail + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert "memoir.editor" not in graph["memoir.persistence"]  # loading an editor lives in the editor


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported first, alone, in its own interpreter (``__main__`` runs the CLI: left out)."""
    def import_alone(module: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True)

    modules = sorted(set(_modules()) - {"memoir.__main__"})
    # One interpreter per module, as many at a time as this process has cores (each is mostly torch's import).
    with ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)))) as pool:
        results = dict(zip(modules, pool.map(import_alone, modules), strict=True))
    failures = {module: done.stderr.strip().splitlines()[-1:] for module, done in results.items() if done.returncode}
    assert not failures, failures
