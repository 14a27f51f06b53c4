"""Build and safely unpack the SageMaker model archive: ``python -m dogbreed.package RUN_DIR -o model.tar.gz``.

Layout (what SageMaker's PyTorch serving container expects, at the archive root)::

    model.pt  model_config.json  classes.json  preprocessing.json   (as the run's model/ dir wrote them)
    package.json                 runtime, exports, top_k, versions, sha256 of every file
    model.pt2 | model.onnx       optional torch.export / ONNX exports (--export); model.ts: TorchScript (deprecated)
    model.xml | model-int8.xml   optional OpenVINO IR, FP32 / INT8 (with its .bin)
    code/inference.py            re-exports the handlers of dogbreed.serve.handlers
    code/requirements.txt        what the runtime needs beyond the container: onnxruntime, openvino, or nothing
    code/dogbreed/...            the handlers' import closure, computed from the code (:func:`served_modules`)
                                 and copied byte for byte from this install; its packages' __init__.py are stubs

Why ship the modules rather than list ``dogbreed`` in ``requirements.txt``: ``dogbreed`` is not on PyPI,
installing it would pull Lightning and Hydra into the endpoint (slow start, large image) and needs network
access that network-isolated endpoints lack; the copied files are exactly the code that built and tested
the package, so serving cannot drift from training. The stock SageMaker PyTorch container (>= 2.1, for
torchvision's transforms v2) already has everything else.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import io
import logging
import shutil
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import torch

import dogbreed
from dogbreed._io import atomic_path, declared_requirements, sha256_file, write_json
from dogbreed.artifacts import (
    CLASSES,
    MODEL_CONFIG,
    MODEL_WEIGHTS,
    PREPROCESSING,
    non_finite_tensors,
    read_model_dir,
)
from dogbreed.serve.calibration import CALIBRATION_SIZE, CheckImages, check_images, run_data
from dogbreed.serve.runtime import (
    DEFAULT_TOP_K,
    EXPORT_FILES,
    PACKAGE_MANIFEST,
    RUNTIME_MODULES,
    RUNTIMES,
    exported_forward,
)

log = logging.getLogger(__name__)

PACKAGE_FORMAT = "dogbreed-model-package/1"
ONNX_OPSET = 17
MAX_UNPACKED_BYTES = 4 * 2**30
# an export is refused when it answers otherwise than eager: FP32 exports on the top class of held-out images,
# INT8 on their accuracy where the images' classes are the model's (else, on the top class, more loosely)
MIN_AGREEMENT = 0.99
MAX_INT8_ACCURACY_LOSS = 0.01
MIN_INT8_AGREEMENT = 0.95

SERVED_MODULE = "dogbreed.serve.handlers"  # what code/inference.py imports; code/ ships its import closure
_PACKAGE_INIT = '"""The subset of dogbreed that serving needs, copied by ``python -m dogbreed.package``."""\n'
INFERENCE_PY = '''"""SageMaker entry point of a dogbreed model package (written by ``python -m dogbreed.package``).

The handlers come from the ``dogbreed`` modules shipped next to this file (copies of those that built the
package), so the stock SageMaker PyTorch container needs no extra installs.
"""

from dogbreed.serve.handlers import model_fn, transform_fn

__all__ = ["model_fn", "transform_fn"]
'''


class ExportRefused(RuntimeError):
    """An export that answers otherwise than eager beyond its bound: the package is not written."""


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the target directory or is not a regular file or folder."""


def find_model_dir(path: str | Path) -> Path:
    """The model dir of ``path``: a run dir (its ``model/``), or a model/package dir itself."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / MODEL_WEIGHTS).is_file():
            return candidate
    raise FileNotFoundError(
        f"{path} holds no {MODEL_WEIGHTS}: pass a run dir (outputs/train/runs/<run>, with model/), its model/ dir, "
        "or an unpacked model package."
    )


def build_package(
    run_dir: str | Path,
    output: str | Path,
    *,
    exports: Iterable[str] = (),
    runtime: str | None = None,
    top_k: int = DEFAULT_TOP_K,
    calibration: str | Path | None = None,
    calibration_size: int = CALIBRATION_SIZE,
) -> Path:
    """Write ``output`` (a ``.tar.gz``) from a run dir; return its path.

    Args:
        run_dir: A training run dir (or its ``model/`` dir).
        output: Archive to write (replaced atomically).
        exports: Extra formats to export, from ``export`` (``torch.export``), ``onnx``, ``openvino``,
            ``openvino-int8`` and ``torchscript`` (deprecated); each is checked against eager.
        runtime: What the endpoint runs: ``eager`` or one of ``exports``; defaults to the first export.
        top_k: Classes returned per image unless a request asks otherwise.
        calibration: Images that calibrate INT8 and check every export (the dogImages layout, or any folder of
            images); default: the run's own dataset, as its ``data-report.json`` names it.
        calibration_size: Training images INT8 is calibrated on.
    """
    exports = list(dict.fromkeys(exports))
    unknown = [e for e in exports if e not in EXPORT_FILES]
    if unknown:
        raise ValueError(f"unknown export {unknown}; choose from {sorted(EXPORT_FILES)}.")
    runtime = runtime or (exports[0] if exports else "eager")
    if runtime not in RUNTIMES or (runtime != "eager" and runtime not in exports):
        raise ValueError(f"runtime={runtime!r} must be eager or one of the exports {exports} (add --export {runtime}).")
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be at least 1.")
    model_dir = find_model_dir(run_dir)
    md = read_model_dir(model_dir)
    if broken := non_finite_tensors(md.state_dict):
        raise ValueError(
            f"{model_dir / MODEL_WEIGHTS} holds NaN/Inf in {len(broken)} tensor(s), e.g. {broken[0]}: the training "
            "diverged and the endpoint would answer NaN. Train again with a lower model.lr (or "
            "trainer.gradient_clip_val=1.0); the run's report/rules.json names the rule that fired."
        )
    output = Path(output)
    with tempfile.TemporaryDirectory(prefix="dogbreed-package-") as tmp:
        root = Path(tmp)
        for name in (MODEL_WEIGHTS, MODEL_CONFIG, CLASSES):
            shutil.copy2(model_dir / name, root / name)
        write_json(root / PREPROCESSING, md.preprocessing.to_dict())
        net = md.network()
        example = torch.rand(2, 3, md.preprocessing.image_size, md.preprocessing.image_size)
        source = calibration or run_data(run_dir)
        images = None
        if exports and source is not None:  # calibration images are decoded only for INT8
            size = calibration_size if "openvino-int8" in exports else 0
            images = check_images(source, md.preprocessing, md.class_names, calibration_size=size)
        recorded = {fmt: _export(fmt, net, example, root / EXPORT_FILES[fmt], images) for fmt in exports}
        write_code(root / "code", runtime)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        write_json(
            root / PACKAGE_MANIFEST,
            {
                "format": PACKAGE_FORMAT,
                "runtime": runtime,
                "exports": recorded,
                "top_k": top_k,
                "backbone": md.backbone,
                "num_classes": len(md.class_names),
                "source": str(Path(run_dir).resolve()),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "versions": {"dogbreed": dogbreed.__version__, "torch": torch.__version__},
                "sha256": {p.relative_to(root).as_posix(): sha256_file(p) for p in files},
            },
        )
        output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(output) as partial, tarfile.open(partial, "w:gz") as tar:
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                tar.add(path, arcname=path.relative_to(root).as_posix(), filter=_normalise_member)
    log.info("Wrote %s (%.1f MB, runtime %s, exports %s)", output, output.stat().st_size / 1e6, runtime, exports)
    return output


def _normalise_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


def _export(fmt: str, net: torch.nn.Module, example: torch.Tensor, path: Path, images: CheckImages | None) -> dict:
    """Export ``net`` to ``path`` and check the export, loaded as serving loads it, against eager."""
    if fmt == "export":
        # the batch dimension stays dynamic: the endpoint batches 1 to max_batch_size images
        program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
        torch.export.save(program, str(path))
        info: dict[str, Any] = {"file": path.name}
    elif fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():  # torch 2.9+ flags TorchScript as deprecated
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.freeze(torch.jit.trace(net, example)), str(path))
        info = {"file": path.name}
    elif fmt == "onnx":
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net, (example,), buffer, input_names=["pixels"], output_names=["logits"], opset_version=ONNX_OPSET,
                dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
            )  # fmt: skip
        path.write_bytes(buffer.getvalue())
        info = {"file": path.name, "opset": ONNX_OPSET}
    else:
        info = {"file": path.name, **_openvino_export(fmt, net, example, path, images)}
    try:
        forward = exported_forward(fmt, path)
    except ImportError as err:
        log.warning("%s was not checked against eager: %s", path.name, err)
        return info
    with torch.inference_mode():
        expected, got = net(example), forward(example)
    if fmt != "openvino-int8":  # quantised logits differ by design: INT8 is held to its answers instead
        diff = float((got - expected).abs().max())
        if diff > 1e-3 * max(1.0, float(expected.abs().max())):
            raise ExportRefused(f"the {fmt} export differs from eager by {diff:.3g} in the logits; not packaging it.")
        info["max_abs_diff"] = diff
    if images is not None:
        info["held_out"] = _held_out_check(fmt, net, forward, images)
    return info


def _openvino_export(
    fmt: str, net: torch.nn.Module, example: torch.Tensor, path: Path, images: CheckImages | None
) -> dict[str, Any]:
    """Convert ``net`` to OpenVINO IR (``.xml`` + ``.bin``); for INT8, quantise it on the calibration images."""
    try:
        import openvino as ov
    except ImportError:
        raise ValueError(f"--export {fmt} needs OpenVINO: pip install -e '.[openvino]'.") from None
    if fmt == "openvino-int8" and images is None:
        raise ValueError(
            "--export openvino-int8 calibrates on the run's training images, which this run dir does not name "
            "(no data-report.json, or its folder is gone): give --calibration DIR, a folder of them."
        )
    size = example.shape[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ov.convert_model(net, example_input=example, input=[ov.PartialShape([-1, 3, size, size])])
    info: dict[str, Any] = {}
    if fmt == "openvino-int8":
        import nncf

        batches = [images.calibration[i : i + 1].numpy() for i in range(len(images.calibration))]
        model = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))
        info = {"calibration": {"source": str(images.source), "images": len(batches)}}
    ov.save_model(model, str(path), compress_to_fp16=False)
    return info


def _held_out_check(
    fmt: str, net: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], images: CheckImages
) -> dict[str, Any]:
    """Top-1 agreement with eager, the largest probability difference and, where the images' classes are known,
    both accuracies, on images the export was not calibrated on; refuse the export beyond its bound."""
    with torch.inference_mode():
        chunks = images.held_out.split(32)
        want = torch.cat([net(chunk) for chunk in chunks]).softmax(1)
        got = torch.cat([forward(chunk) for chunk in chunks]).float().softmax(1)
    result: dict[str, Any] = {
        "images": len(want),
        "top1_agreement": float((want.argmax(1) == got.argmax(1)).float().mean()),
        "max_probability_diff": float((got - want).abs().max()),
    }
    if images.labels is not None:
        result["accuracy_eager"] = float((want.argmax(1) == images.labels).float().mean())
        result["accuracy"] = float((got.argmax(1) == images.labels).float().mean())
    if fmt == "openvino-int8" and "accuracy" in result:
        allowed = max(MAX_INT8_ACCURACY_LOSS, 1 / result["images"])  # one image at least, on a small check set
        if result["accuracy"] < result["accuracy_eager"] - allowed:
            raise ExportRefused(
                f"INT8 answers {result['accuracy']:.3f} of the {result['images']} held-out images right, eager "
                f"{result['accuracy_eager']:.3f}: more than {allowed:.3f} lost; not packaging it. Calibrate on "
                "more images (--calibration-size) or package openvino (FP32)."
            )
    elif result["top1_agreement"] < (MIN_INT8_AGREEMENT if fmt == "openvino-int8" else MIN_AGREEMENT):
        raise ExportRefused(
            f"the {fmt} export agrees with eager on the top class of {result['top1_agreement']:.1%} of "
            f"{result['images']} held-out images; not packaging it."
        )
    return result


def write_code(code: Path, runtime: str) -> None:
    """Write ``code/``: ``inference.py``, the dogbreed modules the handlers need, ``requirements.txt``.

    Shared by :func:`package` and the SageMaker launcher's ``deploy``, so both ship the same handlers.
    """
    source = Path(dogbreed.__file__).resolve().parent
    for module in served_modules():
        relative = _module_file(source, module).relative_to(source)
        target = code / "dogbreed" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relative, target)
        for folder in relative.parents:  # every package on the way gets a stub __init__.py
            (code / "dogbreed" / folder / "__init__.py").write_text(_PACKAGE_INIT)
    (code / "inference.py").write_text(INFERENCE_PY)
    requirements = [
        "# The stock SageMaker PyTorch container (>= 2.1) provides torch, torchvision, pillow and numpy;",
        "# the dogbreed modules the handlers need are shipped in this code/ folder.",
    ]
    requirements += runtime_requirements(runtime)
    (code / "requirements.txt").write_text("\n".join(requirements) + "\n")


def runtime_requirements(runtime: str) -> list[str]:
    """What ``runtime`` imports beyond the stock PyTorch container, pinned as dogbreed's own extras pin it."""
    module = RUNTIME_MODULES.get(runtime)
    if module is None:
        return []
    try:
        pins = [requirement for name, requirement in declared_requirements(None) if name == module]
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"the {runtime} runtime's requirement comes from dogbreed's metadata, and dogbreed is not installed: "
            "`pip install -e .` in the checkout, then package again."
        ) from None
    if not pins:
        raise RuntimeError(f"pyproject.toml declares {module} in no extra: pin it there for the {runtime} runtime.")
    return pins[:1]


def served_modules(entry: str = SERVED_MODULE, source: Path | None = None) -> list[str]:
    """The dogbreed modules ``entry`` imports, directly or through others: what a package's ``code/`` must hold.

    Read from the source (``ast``), not from a running import, so an import inside a function counts as well as
    one at the top; only ``if TYPE_CHECKING:`` blocks are skipped. Packages ship as stub ``__init__.py`` files
    (the real ones would pull in Lightning), so served code must import names from modules: an import of a
    name from a package's ``__init__`` raises :class:`ValueError` naming the file and line. ``source`` is the
    ``dogbreed`` folder to read (this install's by default).
    """
    source = source or Path(dogbreed.__file__).resolve().parent
    found, todo = set(), [entry]
    while todo:
        module = todo.pop()
        if module not in found:
            found.add(module)
            todo.extend(_dogbreed_imports(source, module))
    return sorted(found)


def _module_file(source: Path, module: str) -> Path:
    """``dogbreed.a.b`` -> ``<source>/a/b.py`` (or ``a/b/__init__.py`` for a package)."""
    parts = module.split(".")[1:]
    for path in (source.joinpath(*parts).with_suffix(".py"), source.joinpath(*parts, "__init__.py")):
        if parts and path.is_file():
            return path
    raise ValueError(f"{module} is not a module of {source}")


def _is_module(source: Path, module: str) -> bool:
    return module.startswith("dogbreed.") and source.joinpath(*module.split(".")[1:]).with_suffix(".py").is_file()


def _dogbreed_imports(source: Path, module: str) -> list[str]:
    """The dogbreed modules that ``module``'s source imports anywhere outside ``if TYPE_CHECKING:``."""
    path = _module_file(source, module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    imported = []
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            wanted = [(alias.name, alias.name) for alias in node.names]  # (module to ship, what the code asks for)
        else:
            parts = package.split(".")
            base = ".".join([*parts[: len(parts) - node.level + 1], node.module or ""]) if node.level else node.module
            base = (base or "").rstrip(".")
            wanted = []
            for alias in node.names:
                asked = f"{base}.{alias.name}"
                wanted.append((asked if _is_module(source, asked) else base, asked))
        for name, asked in wanted:
            if name != "dogbreed" and not name.startswith("dogbreed."):
                continue
            if not _is_module(source, name):
                raise ValueError(
                    f"{path.relative_to(source.parent)}:{node.lineno}: served code imports {asked} from a package's "
                    "__init__.py; a model package ships stub __init__.py files, so import it from the module that "
                    "defines it."
                )
            imported.append(name)
    return imported


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree``, at any depth, except in the body of ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def extract_package(archive: str | Path, dest: str | Path) -> Path:
    """Unpack ``archive`` into ``dest`` after checking every member; return ``dest``.

    Raises:
        UnsafeArchiveError: an absolute path, a ``..`` component, a link leaving ``dest``, a device or FIFO,
            or more than ``MAX_UNPACKED_BYTES`` in all. Nothing is written in that case.
    """
    archive, dest = Path(archive), Path(dest)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        total = 0
        for member in members:
            _check_member(archive, member)
            total += member.size
        if total > MAX_UNPACKED_BYTES:
            raise UnsafeArchiveError(f"{archive} unpacks to {total} bytes, more than {MAX_UNPACKED_BYTES}.")
        dest.mkdir(parents=True, exist_ok=True)
        # Python's own "data" filter (3.10.12+) re-checks what the loop above checked.
        safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **safety)
    return dest


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    def refuse(reason: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(
            f"{archive}: refusing to unpack {member.name!r}: {reason}. A model package holds only files and folders "
            "under its root; rebuild it with `python -m dogbreed.package`."
        )

    name = PurePosixPath(member.name)
    if name.is_absolute() or member.name.startswith(("/", "\\")) or (len(member.name) > 1 and member.name[1] == ":"):
        raise refuse("absolute path")
    if ".." in name.parts:
        raise refuse("'..' in the path")
    if member.issym() or member.islnk():
        target = PurePosixPath(member.linkname)
        base = name.parent if member.issym() else PurePosixPath()
        if target.is_absolute() or not _stays_inside(base / target):
            raise refuse(f"link to {member.linkname!r} outside the archive")
    elif not (member.isfile() or member.isdir()):
        raise refuse("not a regular file or folder (device, FIFO ...)")


def _stays_inside(path: PurePosixPath) -> bool:
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else 0 if part in ("", ".") else 1
        if depth < 0:
            return False
    return True


def main(argv: list[str] | None = None) -> None:
    """CLI of ``python -m dogbreed.package``."""
    parser = argparse.ArgumentParser(
        prog="python -m dogbreed.package", description="Build a SageMaker PyTorch model.tar.gz from a training run."
    )
    parser.add_argument("run_dir", help="run dir (outputs/train/runs/<run>) or its model/ dir")
    parser.add_argument("-o", "--output", default="model.tar.gz", help="archive to write (default: model.tar.gz)")
    parser.add_argument(
        "--export", action="append", choices=sorted(EXPORT_FILES), default=[], help="also export (repeatable)"
    )
    parser.add_argument(
        "--runtime", choices=RUNTIMES, help="what the endpoint runs (default: first export, else eager)"
    )
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="classes per answer unless asked otherwise")
    parser.add_argument(
        "--calibration", help="images that calibrate INT8 and check every export (default: the run's own data)"
    )
    parser.add_argument(
        "--calibration-size", type=int, default=CALIBRATION_SIZE, help="training images INT8 is calibrated on"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = build_package(
            args.run_dir, args.output, exports=args.export, runtime=args.runtime, top_k=args.top_k,
            calibration=args.calibration, calibration_size=args.calibration_size,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, ExportRefused) as err:
        parser.exit(2, f"error: {err}\n")
    print(path)
