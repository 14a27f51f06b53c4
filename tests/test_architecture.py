"""The import rules of README "How the code is laid out", checked on the code and on a real run.

Static checks read ``dogbreed/`` with ``ast`` (nothing is imported), so a forbidden import fails here even
on a path no other test executes.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_install import env_with

PACKAGE = Path(__file__).resolve().parents[1] / "dogbreed"
# the extras' own code (study_storage.py is the tune extra's); package.py is the ``python -m dogbreed.package``
# entry point of serve/package.py, and predict.py runs the serving handlers over many files
OUTSIDE_CORE = ("serve/", "sagemaker/", "tune.py", "study_storage.py", "package.py", "predict.py")
OPTIONAL = (
    "dogbreed.serve", "dogbreed.sagemaker", "sagemaker", "optuna", "smdebug", "starlette", "uvicorn", "mlflow",
)  # fmt: skip
TRAINING = ("lightning", "pytorch_lightning", "dogbreed.callbacks", "dogbreed.train")
LIGHTNING_FREE = ("report/", "rules/", "rundir.py")
# what the stock SageMaker PyTorch inference container has for a model package's code/ to import on loading;
# sagemaker_inference is the toolkit itself (imported in a try: the local server runs without it)
STOCK_CONTAINER = ("torch", "torchvision", "PIL", "numpy", "sagemaker_inference")


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, module_level: bool) -> Iterator[tuple[int, str]]:
    """``(line, absolute module name)`` of each import; ``module_level`` leaves out those inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    nodes = list(ast.iter_child_nodes(tree))
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *filter(None, [base])])
            yield node.lineno, base
            yield from ((node.lineno, f"{base}.{alias.name}") for alias in node.names)
        if not (module_level and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)):
            nodes.extend(ast.iter_child_nodes(node))


def _violations(files: list[Path], forbidden: tuple[str, ...], *, module_level: bool) -> list[str]:
    found = []
    for path in files:
        for line, name in _imports(path, module_level=module_level):
            if any(name == f or name.startswith(f"{f}.") for f in forbidden):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    return sorted(set(found))


def _files(*, under: tuple[str, ...] = (), outside: tuple[str, ...] = ()) -> list[Path]:
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if (not under or rel.startswith(under)) and not (outside and rel.startswith(outside)):
            files.append(path)
    return files


def test_core_never_imports_the_extras_at_module_level() -> None:
    """Training, data, models and reports install and import without serving, SageMaker, Optuna or smdebug."""
    assert _violations(_files(outside=OUTSIDE_CORE), OPTIONAL, module_level=True) == []


def test_report_and_rules_never_import_lightning_or_training() -> None:
    """A report is rebuilt from the run dir alone, so the rules and the run dir carry no training code."""
    files = _files(under=LIGHTNING_FREE)
    assert {p.relative_to(PACKAGE).parts[0] for p in files} >= {"report", "rules", "rundir.py"}
    assert _violations(files, TRAINING, module_level=False) == []


def test_serving_never_imports_lightning_or_training() -> None:
    """An endpoint (and batch prediction, its code path) starts fast with few dependencies: no Lightning."""
    files = _files(under=("serve/", "predict.py"))
    assert PACKAGE / "predict.py" in files
    assert _violations(files, TRAINING, module_level=False) == []


def test_a_model_package_loads_with_what_a_stock_container_has() -> None:
    """The modules a package ships (its handlers' import closure) import only the container's packages on loading;
    the codec, which the local server shares, knows no model."""
    from dogbreed.serve.package import served_modules

    files = [PACKAGE.joinpath(*m.split(".")[1:]).with_suffix(".py") for m in served_modules()]
    assert PACKAGE / "serve" / "handlers.py" in files and PACKAGE / "serve" / "codec.py" in files
    allowed = {*sys.stdlib_module_names, *STOCK_CONTAINER, "dogbreed"}
    outside = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for path in files
        for line, name in _imports(path, module_level=True)
        if name.split(".")[0] not in allowed
    ]
    assert outside == []
    assert _violations(files, ("dogbreed.serve.server", "dogbreed.serve.package"), module_level=False) == []
    codec = [PACKAGE / "serve" / "codec.py"]
    assert _violations(codec, ("dogbreed.serve.runtime", "dogbreed.serve.handlers"), module_level=False) == []


def test_the_checks_see_imports() -> None:
    """The checker itself: relative, nested and module-level imports resolve to the names the rules use."""
    callbacks = _imports(PACKAGE / "callbacks" / "debugger.py", module_level=True)
    assert {"lightning", "dogbreed.rules", "dogbreed.rundir"} <= {name for _, name in callbacks}
    assert _violations([PACKAGE / "train.py"], TRAINING, module_level=True)


def test_report_builds_without_lightning(debug_demo_run: Path, tmp_path: Path) -> None:
    """``python -m dogbreed.report RUN_DIR`` in a process where Lightning and torchmetrics cannot be imported."""
    run_dir = tmp_path / "run"
    shutil.copytree(debug_demo_run, run_dir, ignore=shutil.ignore_patterns("report"))
    hidden = {"lightning": "lightning", "pytorch_lightning": "pytorch-lightning", "torchmetrics": "torchmetrics"}
    env = env_with(tmp_path, hidden)
    probe = "import importlib.util as u; print([u.find_spec(m) for m in ('lightning', 'pytorch_lightning')])"
    hiding = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert hiding.stdout.strip() == "[None, None]"
    result = subprocess.run(
        [sys.executable, "-m", "dogbreed.report", str(run_dir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "report" / "profiler-report.html").is_file()
    assert (run_dir / "report" / "rules.json").is_file()


@pytest.mark.parametrize(
    "module", ["dogbreed.report", "dogbreed.rules", "dogbreed.rundir", "dogbreed.predict", "dogbreed.data.layout"]
)
def test_lightning_free_modules_import_without_lightning(module: str, tmp_path: Path) -> None:
    """Importing them loads no Lightning even where it is installed (a lazy import would pass the ast check)."""
    code = (
        f"import sys, {module}; "
        f"print(sorted(m for m in sys.modules if any(m == t or m.startswith(t + '.') for t in {TRAINING})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert result.stdout.strip() == "[]"
