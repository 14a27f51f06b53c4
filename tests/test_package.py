"""The model package: round trip through model_fn, the archive's own inference.py, exports, safe unpacking."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement

from dogbreed.serve import package as packaging
from dogbreed.serve import runtime as runtime_module
from dogbreed.serve.handlers import input_fn, model_fn, output_fn, predict_fn
from dogbreed.serve.package import UnsafeArchiveError, build_package, extract_package, main, served_modules

from .conftest import TINY_BREEDS, write_image_folder
from .installed import IsolatedPython

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "images" / "Labrador_retriever_06457.jpg"


@pytest.fixture(autouse=True)
def _one_thread(_few_threads: None) -> None:
    torch.set_num_threads(1)  # see tests/test_serve_handlers.py


def answer(model_dir: Path | str, body: bytes = b"") -> dict:
    model = model_fn(str(model_dir))
    content, _ = output_fn(predict_fn(input_fn(body or PHOTO.read_bytes(), "image/jpeg"), model), "application/json")
    return json.loads(content)


@pytest.fixture(scope="module")
def package(tiny_package: Callable[..., Path]) -> Path:
    return tiny_package(top_k=3)  # shared with the other files' tests (conftest): read-only


@pytest.mark.parametrize("runtime", sorted(runtime_module.RUNTIME_MODULES))
def test_a_runtimes_requirement_is_pinned_as_pyproject_pins_it(runtime: str) -> None:
    """code/requirements.txt repeats the pin of the extra that brings the runtime's module, not a copy of it."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    module = runtime_module.RUNTIME_MODULES[runtime]
    pinned = {
        requirement
        for extra in pyproject["project"]["optional-dependencies"].values()
        for requirement in extra
        if Requirement(requirement).name == module
    }
    assert len(pinned) == 1, f"pyproject.toml pins {module} {len(pinned)} times"
    assert [r.replace(" ", "") for r in packaging.runtime_requirements(runtime)] == [
        str(Requirement(pinned.pop())).replace(" ", "")
    ]


def test_package_layout_and_round_trip(package: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    with tarfile.open(package) as tar:
        names = set(tar.getnames())
    assert {"model.pt", "classes.json", "preprocessing.json", "model_config.json", "package.json"} <= names
    assert {"code/inference.py", "code/requirements.txt", "code/dogbreed/serve/handlers.py"} <= names
    assert not any(name.startswith(("/", "./")) or ".." in name for name in names)
    root = extract_package(package, tmp_path / "model")
    manifest = json.loads((root / "package.json").read_text())
    assert manifest["runtime"] == "eager" and manifest["exports"] == {} and manifest["top_k"] == 3
    assert "onnxruntime" not in (root / "code" / "requirements.txt").read_text()
    shipped = (root / "code" / "dogbreed" / "transforms.py").read_bytes()
    assert shipped == (Path(__file__).resolve().parents[1] / "dogbreed" / "transforms.py").read_bytes()
    got = answer(root)["predictions"]
    want = answer(tiny_model_dir)["predictions"]
    assert len(got) == 3  # the package's top_k
    assert got == want[:3]


CLEAN_CONTAINER = """
import importlib, json, sys

class NotOnTheContainer:
    # A stock SageMaker PyTorch container has torch, torchvision, pillow and numpy, not these.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"lightning", "hydra", "omegaconf", "torchmetrics", "starlette", "uvicorn"}:
            raise ImportError(name + " is not installed on a stock SageMaker PyTorch container")

sys.meta_path.insert(0, NotOnTheContainer())
model_dir, photo = sys.argv[1], sys.argv[2]
sys.path.insert(0, model_dir + "/code")  # what the SageMaker inference toolkit does
inference = importlib.import_module("inference")
import dogbreed
assert dogbreed.__file__.startswith(model_dir), dogbreed.__file__
class Context:  # the part of TorchServe's request context that transform_fn uses
    status = None

    def set_response_status(self, code=200, phrase="", idx=0):
        self.status = code

model, context = inference.model_fn(model_dir), Context()
body, content_type = inference.transform_fn(model, open(photo, "rb").read(), "image/jpeg", "application/json", context)
assert context.status is None and content_type == "application/json", (context.status, body)
print(body.decode())
"""


def test_archive_inference_py_runs_from_a_clean_directory(
    package: Path, bare_python: IsolatedPython, tmp_path: Path
) -> None:
    """On a Python without dogbreed (tests/installed.py), as the stock container: only the package's code/."""
    root = extract_package(package, tmp_path / "opt" / "ml" / "model")
    clean = tmp_path / "elsewhere"
    clean.mkdir()
    result = subprocess.run(
        [str(bare_python.python), "-c", CLEAN_CONTAINER, str(root), str(PHOTO)],
        cwd=clean, env=bare_python.env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == answer(root)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_exports_round_trip(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exports = ["export", "torchscript", "onnx"]
    archive = build_package(tiny_model_dir, tmp_path / "m.tar.gz", exports=exports, runtime="onnx")
    root = extract_package(archive, tmp_path / "model")
    manifest = json.loads((root / "package.json").read_text())
    assert manifest["runtime"] == "onnx" and set(manifest["exports"]) == set(exports)
    assert packaging.runtime_requirements("onnx")[0] in (root / "code" / "requirements.txt").read_text()
    eager = answer(tiny_model_dir)["predictions"]
    for runtime in exports:
        monkeypatch.setenv("DOGBREED_RUNTIME", runtime)  # how a SageMaker Model's env picks the runtime
        assert model_fn(str(root)).runtime == runtime
        got = answer(root)["predictions"]
        assert [p["index"] for p in got] == [p["index"] for p in eager]
        assert [p["probability"] for p in got] == pytest.approx([p["probability"] for p in eager], abs=1e-4)
    monkeypatch.setenv("DOGBREED_RUNTIME", "auto")  # the fastest the package carries and this Python runs
    assert model_fn(str(root)).runtime == "onnx"
    monkeypatch.setattr(runtime_module, "find_spec", lambda name: None if name == "onnxruntime" else find_spec(name))
    assert model_fn(str(root)).runtime == "eager"  # as fast as export (README's runtime table), and it explains


@pytest.mark.slow
def test_openvino_fp32_and_int8_are_calibrated_checked_and_served(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """INT8 is calibrated on the training split and held to its accuracy on the validation split; both serve."""
    data = write_image_folder(tmp_path / "data", classes=TINY_BREEDS, counts={"train": 4, "valid": 3})
    exports = ["openvino", "openvino-int8"]
    archive = build_package(
        tiny_model_dir, tmp_path / "m.tar.gz", exports=exports, runtime="openvino-int8", calibration=data,
        calibration_size=20,
    )  # fmt: skip
    root = extract_package(archive, tmp_path / "model")
    recorded = json.loads((root / "package.json").read_text())["exports"]
    assert recorded["openvino-int8"]["calibration"] == {"source": str(data), "images": 20}
    int8, fp32 = recorded["openvino-int8"]["held_out"], recorded["openvino"]["held_out"]
    assert int8["images"] == 30 and "accuracy" in int8 and "accuracy_eager" in int8  # the folders are its classes
    assert fp32["top1_agreement"] == 1.0 and fp32["max_probability_diff"] < 1e-4
    assert packaging.runtime_requirements("openvino-int8")[0] in (root / "code" / "requirements.txt").read_text()
    eager = answer(tiny_model_dir)["predictions"]
    assert model_fn(str(root)).runtime == "openvino-int8"
    monkeypatch.setenv("DOGBREED_RUNTIME", "auto")
    assert model_fn(str(root)).runtime == "openvino-int8"
    assert answer(root)["predictions"][0]["label"] in TINY_BREEDS
    monkeypatch.setenv("DOGBREED_RUNTIME", "openvino")
    got = answer(root)["predictions"]
    assert [p["probability"] for p in got] == pytest.approx([p["probability"] for p in eager], abs=1e-4)

    with pytest.raises(ValueError, match="--calibration DIR"):
        build_package(tiny_model_dir, tmp_path / "no.tar.gz", exports=["openvino-int8"])
    monkeypatch.setattr(packaging, "MIN_AGREEMENT", 1.01)  # an export that answers otherwise is refused
    with pytest.raises(SystemExit) as info:
        main([str(tiny_model_dir), "-o", str(tmp_path / "no.tar.gz"), "--export", "export", "--calibration", str(data)])
    assert info.value.code == 2 and not (tmp_path / "no.tar.gz").exists()
    error = capsys.readouterr().err
    assert "agrees with eager on the top class of 100.0% of 30 held-out images; not packaging it" in error
    assert "Traceback" not in error


def test_package_cli_errors(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path), "-o", str(tmp_path / "m.tar.gz")])
    assert info.value.code == 2
    assert "holds no model.pt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--export onnx"):
        build_package(tiny_model_dir, tmp_path / "m.tar.gz", runtime="onnx")


def test_diverged_weights_are_flagged_on_export_and_refused_by_package(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """The lr=1e30 example's all-NaN weights: training says so loudly, packaging refuses them."""
    from dogbreed.artifacts import write_model_dir
    from dogbreed.models.backbone import create_backbone
    from dogbreed.transforms import Preprocessing

    net, _ = create_backbone("resnet18", num_classes=3)
    with torch.no_grad():
        net.fc.weight.fill_(float("nan"))
    with caplog.at_level("ERROR", logger="dogbreed.artifacts"):
        model_dir = write_model_dir(
            tmp_path / "model", net, backbone="resnet18", class_names=["a", "b", "c"], preprocessing=Preprocessing()
        )
    assert "NaN/Inf in 1 tensor(s), e.g. fc.weight" in caplog.text
    with pytest.raises(SystemExit) as info:
        main([str(model_dir), "-o", str(tmp_path / "m.tar.gz")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "fc.weight" in err and "model.lr" in err and "Traceback" not in err
    assert not (tmp_path / "m.tar.gz").exists()


def test_a_small_stem_model_is_rebuilt_with_its_stem_when_served_and_packaged(tmp_path: Path) -> None:
    from dogbreed.artifacts import write_model_dir
    from dogbreed.models.backbone import create_backbone
    from dogbreed.transforms import Preprocessing

    torch.manual_seed(0)
    net, _ = create_backbone("resnet18", num_classes=3, stem="small")
    model_dir = write_model_dir(
        tmp_path / "model", net, backbone="resnet18", stem="small", class_names=["a", "b", "c"],
        preprocessing=Preprocessing(image_size=28, resize_size=28),
    )  # fmt: skip
    assert json.loads((model_dir / "model_config.json").read_text())["stem"] == "small"
    pixels = torch.rand(1, 3, 28, 28)
    with torch.no_grad():
        want = net.eval()(pixels).softmax(1)
    assert torch.allclose(model_fn(str(model_dir)).predict(pixels), want, atol=1e-5)
    root = extract_package(build_package(model_dir.parent, tmp_path / "model.tar.gz"), tmp_path / "pkg")
    assert torch.allclose(model_fn(str(root)).predict(pixels), want, atol=1e-5)


def crafted(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("model.pt")
        ok.size = 1
        tar.addfile(ok, io.BytesIO(b"x"))
        if member.isfile():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)
    return path


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (tarfile.TarInfo("../escaped.txt"), "'..'"),
        (tarfile.TarInfo("code/../../escaped.txt"), "'..'"),
        (tarfile.TarInfo("/tmp/escaped.txt"), "absolute"),
        (link("code/inference.py", "../../../etc/passwd"), "outside"),
        (link("code/inference.py", "/etc/passwd"), "outside"),
        (link("model.onnx", "../outside", tarfile.LNKTYPE), "outside"),
        (link("fifo", "", tarfile.FIFOTYPE), "not a regular file"),
    ],
)
def test_unsafe_archives_are_refused(tmp_path: Path, member: tarfile.TarInfo, reason: str) -> None:
    archive = crafted(tmp_path, member)
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError, match=reason):
        extract_package(archive, dest)
    assert not dest.exists()  # nothing was written
    assert not (tmp_path / "escaped.txt").exists()


def test_links_inside_the_archive_are_fine(tmp_path: Path) -> None:
    archive = crafted(tmp_path, link("code/weights.pt", "../model.pt"))
    root = extract_package(archive, tmp_path / "dest")
    assert (root / "code" / "weights.pt").read_bytes() == b"x"


def test_the_package_ships_the_handlers_import_closure(package: Path) -> None:
    """What code/ holds is computed: the handlers, what they import and what that imports, and nothing else."""
    closure = served_modules()
    served = ("serve.handlers", "serve.runtime", "serve.codec", "artifacts", "_io", "rundir", "models.backbone")
    assert {f"dogbreed.{m}" for m in (*served, "transforms")} <= set(closure)
    assert not {"dogbreed.models.classifier", "dogbreed.train", "dogbreed.serve.server"} & set(closure)
    with tarfile.open(package) as tar:
        shipped = {n for n in tar.getnames() if n.startswith("code/dogbreed/") and not n.endswith("__init__.py")}
    assert shipped == {"code/" + m.replace(".", "/") + ".py" for m in closure}


def write_modules(root: Path, modules: dict[str, str]) -> Path:
    for name, text in modules.items():
        path = root.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "dogbreed"


def test_the_closure_follows_every_import_form(tmp_path: Path) -> None:
    """Relative, nested and function-level imports count; ``if TYPE_CHECKING:`` and third-party ones do not."""
    source = write_modules(tmp_path, {
        "dogbreed.__init__": "", "dogbreed.serve.__init__": "", "dogbreed.models.__init__": "",
        "dogbreed.serve.handlers": "import torch\nfrom . import codec\nfrom .runtime import load\n",
        "dogbreed.serve.codec": "def f():\n    from dogbreed._io import x\n",
        "dogbreed.serve.runtime": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import dogbreed.train\n"
                                  "else:\n    import dogbreed.models.backbone\n",
        "dogbreed._io": "", "dogbreed.models.backbone": "from ..transforms import T\n", "dogbreed.transforms": "",
        "dogbreed.train": "",
    })  # fmt: skip
    assert served_modules(source=source) == [
        "dogbreed._io", "dogbreed.models.backbone", "dogbreed.serve.codec", "dogbreed.serve.handlers",
        "dogbreed.serve.runtime", "dogbreed.transforms",
    ]  # fmt: skip


def test_an_import_from_a_package_init_is_refused(tmp_path: Path) -> None:
    """A package ships stub ``__init__.py`` files, so a name taken from a package's ``__init__`` would fail to load."""
    source = write_modules(tmp_path, {
        "dogbreed.__init__": "", "dogbreed.serve.__init__": "", "dogbreed.models.__init__": "",
        "dogbreed.models.backbone": "", "dogbreed.serve.handlers": "\nfrom dogbreed.models import create_backbone\n",
    })  # fmt: skip
    with pytest.raises(ValueError, match=r"dogbreed/serve/handlers.py:2: served code imports "
                       r"dogbreed.models.create_backbone from a package's __init__.py"):  # fmt: skip
        served_modules(source=source)
