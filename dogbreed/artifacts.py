"""The files a run leaves behind, written and read in one place.

``model/`` (what serving needs, and nothing of Lightning):
    ``model.pt`` (state dict of the torchvision network), ``model_config.json`` (backbone, stem,
    backbone_kwargs, num_classes, test_time_flip),
    ``classes.json`` (display names in label order) and ``preprocessing.json`` (eval transform settings).
Run dir:
    ``metrics.json`` (test metrics, per-class accuracy, best checkpoint), ``confusion_matrix.csv`` and
    ``confusion_matrix.png``.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dogbreed._io import atomic_path, write_json
from dogbreed.models.backbone import build_backbone_kwargs, create_backbone
from dogbreed.rundir import CLASSES, CONFUSION_CSV, CONFUSION_PNG, METRICS, MODEL_CONFIG, MODEL_WEIGHTS, PREPROCESSING
from dogbreed.transforms import Preprocessing

log = logging.getLogger(__name__)


def non_finite_tensors(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf: the weights of a diverged training."""
    return [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def write_model_dir(
    model_dir: str | Path,
    net: nn.Module,
    *,
    backbone: str,
    class_names: list[str],
    preprocessing: Preprocessing,
    stem: str = "imagenet",
    backbone_kwargs: dict[str, Any] | None = None,
    test_time_flip: bool = False,
) -> Path:
    """Export the trained network and everything inference needs to rebuild it.

    ``backbone_kwargs`` is the constructor arguments' recorded form (see
    :func:`~dogbreed.models.backbone.build_backbone_kwargs`), checked before anything is written. Weights with
    NaN/Inf are still written (the run's other results stay consistent with them) but flagged loudly;
    ``python -m dogbreed.package`` refuses them.
    """
    build_backbone_kwargs(backbone_kwargs)
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if broken := non_finite_tensors(state):
        log.error(
            "The exported weights hold NaN/Inf in %d tensor(s), e.g. %s: training diverged and this model answers "
            "NaN. Lower model.lr or add trainer.gradient_clip_val=1.0 and train again; it cannot be packaged.",
            len(broken), broken[0],
        )  # fmt: skip
    with atomic_path(model_dir / MODEL_WEIGHTS) as tmp:
        torch.save(state, tmp)
    config = {
        "backbone": backbone, "stem": stem, "backbone_kwargs": backbone_kwargs or {}, "num_classes": len(class_names),
        "test_time_flip": test_time_flip,
    }  # fmt: skip
    write_json(model_dir / MODEL_CONFIG, config)
    write_json(model_dir / CLASSES, class_names)
    write_json(model_dir / PREPROCESSING, preprocessing.to_dict())
    return model_dir


@dataclass
class ModelDir:
    """What :func:`write_model_dir` wrote, read back."""

    state_dict: dict[str, torch.Tensor]
    backbone: str
    class_names: list[str]
    preprocessing: Preprocessing
    stem: str = "imagenet"  # model directories written before the option have the backbone's own stem
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # recorded form, as model_config.json keeps it
    test_time_flip: bool = False  # answer with the mean logits of the image and its mirror image

    def network(self) -> nn.Module:
        """The trained torchvision network, rebuilt as it was trained, in eval mode on the CPU."""
        net, _ = create_backbone(
            self.backbone, num_classes=len(self.class_names), weights=None, stem=self.stem,
            **build_backbone_kwargs(self.backbone_kwargs),
        )  # fmt: skip
        net.load_state_dict(self.state_dict)
        return net.eval()


def read_model_dir(model_dir: str | Path) -> ModelDir:
    """Load an exported model directory (weights with ``weights_only=True``: nothing is unpickled)."""
    model_dir = Path(model_dir)
    missing = [n for n in (MODEL_WEIGHTS, MODEL_CONFIG, CLASSES, PREPROCESSING) if not (model_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir} is not a dogbreed model directory: missing {missing}.")
    config = json.loads((model_dir / MODEL_CONFIG).read_text())
    class_names = json.loads((model_dir / CLASSES).read_text())
    if config["num_classes"] != len(class_names):
        raise ValueError(
            f"{model_dir}: {MODEL_CONFIG} says {config['num_classes']} classes, {CLASSES} lists {len(class_names)}."
        )
    return ModelDir(
        state_dict=torch.load(model_dir / MODEL_WEIGHTS, map_location="cpu", weights_only=True),
        backbone=config["backbone"],
        class_names=class_names,
        preprocessing=Preprocessing.from_dict(json.loads((model_dir / PREPROCESSING).read_text())),
        stem=config.get("stem", "imagenet"),
        backbone_kwargs=config.get("backbone_kwargs") or {},
        test_time_flip=bool(config.get("test_time_flip", False)),
    )


def write_test_results(
    run_dir: str | Path, metrics: dict[str, float], confusion: torch.Tensor | None, class_names: list[str], **extra: Any
) -> dict[str, Any]:
    """Write ``metrics.json`` and the confusion matrix (CSV and PNG); return what ``metrics.json`` holds."""
    run_dir = Path(run_dir)
    result: dict[str, Any] = {k: float(v) for k, v in sorted(metrics.items())}
    if confusion is not None:
        confusion = confusion.to(torch.int64)
        per_class = confusion.diag().double() / confusion.sum(dim=1).clamp(min=1)
        result["test/per_class_acc"] = {
            name: round(float(a), 4) for name, a in zip(class_names, per_class, strict=True)
        }
        write_confusion_csv(run_dir / CONFUSION_CSV, confusion, class_names)
        plot_confusion_matrix(confusion, class_names, run_dir / CONFUSION_PNG)
    result.update(extra)
    write_json(run_dir / METRICS, result)
    return result


def write_confusion_csv(path: Path, confusion: torch.Tensor, class_names: list[str]) -> None:
    """One row per true class, one column per predicted class (the test's and batch prediction's layout)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, confusion.tolist(), strict=True):
            writer.writerow([name, *row])


def plot_confusion_matrix(confusion: torch.Tensor, class_names: list[str], path: Path) -> None:
    """Row-normalised confusion matrix; labels are drawn only while they stay legible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    normalised = (confusion.double() / confusion.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    size = min(24.0, 4 + 0.18 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if normalised[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = confusion.diag().sum() / confusion.sum()
    ax.set_title(f"Test confusion matrix ({int(confusion.sum())} images, accuracy {accuracy:.1%})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
