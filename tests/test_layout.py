"""The layering rules, checked on the source: serving code never imports development tooling, the
core stays pure, clients talk to servers only over the wire."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast
ROOT = Path(__file__).resolve().parent.parent
SERVING = ["flux_triton", "model_repository"]
CORE = ["model_info", "specs", "request", "sampling", "pipeline", "recovery", "preview", "batching",
        "placement", "serving_config", "dispatch", "errors", "images"]
# Image inputs are prepared by diffusers' own image processor (through PIL), so they match the
# diffusers pipelines by construction rather than by a copy of their resizing code.
CORE_LIBRARIES = {"images": {"diffusers", "PIL"}}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _offenders(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)} imports {name}" for path in files
            for name in sorted(imported_modules(path))
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


def test_serving_code_never_imports_dev_tooling_or_tests():
    files = _files(*SERVING)
    assert len(files) > 20
    assert _offenders(files, ("devtools", "tests", "benchmarks")) == []


def test_core_imports_only_torch_numpy_and_itself():
    allowed_third_party = {"torch", "numpy"}
    problems = []
    for name in CORE:
        path = ROOT / "flux_triton" / f"{name}.py"
        for module in imported_modules(path):
            top = module.split(".")[0]
            if top == "flux_triton":
                if module != "flux_triton" and module.split(".")[1] not in CORE:
                    problems.append(f"{name} imports {module}")
            elif top in allowed_third_party | CORE_LIBRARIES.get(name, set()) or top in _stdlib():
                continue
            else:
                problems.append(f"{name} imports {module}")
    assert problems == []


def test_runtimes_do_not_know_triton():
    files = _files("flux_triton/runtime") + [ROOT / "flux_triton" / f"{n}.py" for n in CORE]
    assert _offenders(files, ("triton_python_backend_utils", "tritonclient", "flux_triton.adapters",
                              "flux_triton.export", "flux_triton.clients", "flux_triton.gateway",
                              "flux_triton.server")) == []


def test_clients_talk_over_the_wire_only():
    """The gRPC client and the HTTP gateway need neither torch nor diffusers (`.[client]`)."""
    assert _offenders(_files("flux_triton/clients", "flux_triton/gateway"), (
        "torch", "flux_triton.runtime", "flux_triton.adapters", "flux_triton.pipeline",
        "flux_triton.sampling", "flux_triton.recovery", "flux_triton.server", "diffusers",
        "transformers", "flux_triton.export")) == []


def test_server_lifecycle_needs_no_torch():
    """The launcher and the supervisor import neither torch nor the adapters: the process that
    keeps a server alive stays small and starts fast."""
    import subprocess
    import sys

    assert _offenders(_files("flux_triton/server"), ("torch", "flux_triton.adapters",
                                                     "flux_triton.runtime")) == []
    loaded = subprocess.run([sys.executable, "-c", (
        "import sys, flux_triton.server.launcher, flux_triton.server.supervisor;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))")],
        capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert loaded.strip() == "[]", loaded


def test_model_repository_adapters_are_thin():
    for path in (ROOT / "model_repository").glob("*/1/model.py"):
        code = [line for line in path.read_text().splitlines() if line.strip()]
        assert len(code) <= 10, f"{path.relative_to(ROOT)} has {len(code)} lines of code"


def _stdlib() -> frozenset[str]:
    import sys

    return frozenset(sys.stdlib_module_names) | {"__future__"}


def test_the_distribution_installs_one_namespace(tmp_path):
    """`pip install .` puts flux_triton alone into site-packages (no top-level `export`, `clients`,
    `gateway` or dev tooling), with its data files and the console scripts."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=lambda folder, names: [
        n for n in names if n in (".venv", ".git", "models", "out", "build", "__pycache__")])
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(source)], check=True, cwd=tmp_path)
    wheel = zipfile.ZipFile(next(tmp_path.glob("*.whl")))
    names = wheel.namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"flux_triton"}
    assert {"flux_triton/gateway/static/index.html", "flux_triton/export/engine_config.json"} <= set(names)
    entry_points = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("flux-client = flux_triton.clients.stream_client:main",
                   "flux-gateway = flux_triton.gateway.app:main",
                   "flux-load = flux_triton.clients.load:main"):
        assert script in entry_points
