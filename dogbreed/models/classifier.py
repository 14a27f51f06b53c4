"""``DogBreedClassifier``: a torchvision backbone fine-tuned for breed classification, with its metrics."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MaxMetric, MetricCollection, MinMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from dogbreed.models.backbone import backbone_kwargs_spec, build_backbone_kwargs, create_backbone, flip_averaged

OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[..., LRScheduler]

# Validation metrics whose best value so far is logged as ``<name>_best``, and which way is better. A tuner that
# scores a run by the last value it printed (SageMaker's) then scores the best epoch: the checkpoint that
# training tests and exports, and the value the local Optuna tuner takes from the checkpoint callback.
BEST_MODES: dict[str, str] = {"val/loss": "min", "val/acc": "max", "val/acc_top5": "max"}
_BEST_CHECKPOINT_KEY = "dogbreed_val_best"


class DogBreedClassifier(L.LightningModule):
    """Image classifier over ``num_classes`` breeds.

    Args:
        num_classes: Output classes; required, since only the data knows it (``${data.num_classes}`` in the config).
        backbone: torchvision model name.
        weights: ``None``, a torchvision weights name (``IMAGENET1K_V1``) or a state-dict path / ``s3://`` URI.
        stem: ``imagenet``, or ``small`` for 28-64 px inputs (see :func:`~dogbreed.models.backbone.create_backbone`).
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay, applied to weights but not to biases and norm parameters.
        label_smoothing: Cross-entropy label smoothing.
        test_time_flip: Evaluate (validation, test, and the exported model when served) on the mean logits of
            each image and its mirror image: one more forward pass per image for a steadier answer on data whose
            classes are mirror-symmetric (the training flips them already).
        optimizer: ``partial`` optimiser class taking ``(params, lr=, weight_decay=)``; AdamW when None.
        scheduler: ``partial`` taking ``(optimizer, total_steps=)``, stepped every step; constant lr when None.
        channels_last: Use the NHWC memory format (faster convolutions with AMP on tensor-core GPUs).
        compile: ``torch.compile`` the network in place (state-dict keys stay unchanged); pays a one-off
            compilation at the first batches, so it helps long runs on GPUs.
        backbone_kwargs: Extra torchvision constructor arguments, built (a ``norm_layer`` partial, as Hydra
            instantiates ``_target_``) or in their recorded form; kept in the checkpoint recorded, so that
            ``load_from_checkpoint`` and the exported model rebuild the same network.
        weights_cache_dir: Cache for ``s3://`` weight files.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        weights: str | None = "IMAGENET1K_V1",
        stem: str = "imagenet",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        label_smoothing: float = 0.0,
        test_time_flip: bool = False,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        channels_last: bool = False,
        compile: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        weights_cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        # logger=False: train() logs the whole composed config to every logger, of which these are a part
        self.save_hyperparameters(
            ignore=["optimizer", "scheduler", "weights_cache_dir", "backbone_kwargs"], logger=False
        )
        # recorded, not as objects (a norm_layer partial), which checkpoints loaded with weights_only refuse
        self.hparams["backbone_kwargs"] = backbone_kwargs_spec(backbone_kwargs)
        self.net, self.head_name = create_backbone(
            backbone, num_classes, weights, cache_dir=weights_cache_dir, stem=stem,
            **build_backbone_kwargs(self.hparams.backbone_kwargs),
        )  # fmt: skip
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if compile:
            self.net.compile()
        self.optimizer_factory = optimizer or partial(torch.optim.AdamW)
        self.scheduler_factory = scheduler or None  # the empty group model/scheduler=constant means none
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        top_k = min(5, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "acc_top5": MulticlassAccuracy(num_classes, top_k=top_k, average="micro"),
            },
            prefix="val/",
        )
        self.val_best = nn.ModuleDict(
            {name: MaxMetric() if mode == "max" else MinMetric() for name, mode in BEST_MODES.items()}
        )
        self.test_metrics = self.val_metrics.clone(prefix="test/")
        self.test_metrics.add_metrics({"f1_macro": MulticlassF1Score(num_classes, average="macro")})
        self.test_confmat = MulticlassConfusionMatrix(num_classes)
        self.test_confusion: torch.Tensor | None = None

    @property
    def head(self) -> nn.Module:
        return self.net.get_submodule(self.head_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for evaluation: with ``test_time_flip``, the mean of the image's and its mirror image's."""
        if self.hparams.test_time_flip:
            return flip_averaged(self, x)
        return self(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.evaluate(x)
        self.log("val/loss", self.criterion(logits, y), prog_bar=True, sync_dist=True)
        self.val_metrics(logits, y)
        self.log_dict(self.val_metrics, prog_bar=True)

    def setup(self, stage: str) -> None:
        """Each fit starts with no best value; a resumed fit gets its best back from the checkpoint (loaded later)."""
        if stage == "fit":
            for best in self.val_best.values():
                best.reset()

    def on_validation_epoch_end(self) -> None:
        """Log ``val/acc_best`` (etc.): the best epoch-level value so far, not counting the sanity check."""
        if self.trainer.sanity_checking:
            return
        for name, best in self.val_best.items():
            value = self.trainer.callback_metrics.get(name)  # this epoch's aggregate, synced across processes
            if value is None:
                continue
            best.update(value)
            # log the computed value, not the metric: Lightning resets logged metrics after every epoch
            self.log(f"{name}_best", best.compute(), sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the best values in the checkpoint, so that a resumed run (a restarted spot job) still knows them."""
        checkpoint[_BEST_CHECKPOINT_KEY] = {
            name: best.compute() for name, best in self.val_best.items() if best.update_count
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for name, value in checkpoint.get(_BEST_CHECKPOINT_KEY, {}).items():
            self.val_best[name].update(value)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.evaluate(x)
        self.log("test/loss", self.criterion(logits, y), sync_dist=True)
        self.test_metrics(logits, y)
        self.log_dict(self.test_metrics)
        self.test_confmat.update(logits, y)

    def on_test_epoch_end(self) -> None:
        """Keep the confusion matrix (rows: true class) for the run's test report."""
        self.test_confusion = self.test_confmat.compute().cpu()
        self.test_confmat.reset()

    def configure_optimizers(self) -> Optimizer | dict[str, Any]:
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = self.optimizer_factory(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
