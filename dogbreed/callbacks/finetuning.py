"""Freeze the pretrained backbone for the first epochs, then fine-tune it at a lower learning rate."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger(__name__)


class BackboneFreezeUnfreeze(BaseFinetuning):
    """Train only the new head until ``unfreeze_at_epoch``, then the whole network.

    The backbone joins the optimiser as a new parameter group at ``backbone_lr_factor`` x the head's
    lr, so the pretrained features move gently; per-step ``LambdaLR`` schedules extend to that group.
    The model must expose ``net`` and ``head`` (as :class:`~dogbreed.models.DogBreedClassifier` does).

    Args:
        unfreeze_at_epoch: First epoch (0-based) in which the backbone trains; 0 never freezes it.
        backbone_lr_factor: The backbone's lr relative to the optimiser's current lr.
        train_bn: Whether BatchNorm layers train while the backbone is frozen.
    """

    def __init__(self, unfreeze_at_epoch: int = 1, backbone_lr_factor: float = 0.1, train_bn: bool = False) -> None:
        super().__init__()
        if unfreeze_at_epoch < 0:
            raise ValueError(f"unfreeze_at_epoch must be >= 0, got {unfreeze_at_epoch}.")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.backbone_lr_factor = backbone_lr_factor
        self.train_bn = train_bn

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        if self.unfreeze_at_epoch > 0:
            self.freeze(pl_module.net, train_bn=self.train_bn)
            self.make_trainable(pl_module.head)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > self.unfreeze_at_epoch:
            # Resumed past the unfreeze epoch: the optimiser groups are restored, the flags are not.
            self.make_trainable(pl_module.net)
        super().on_train_epoch_start(trainer, pl_module)

    def finetune_function(self, pl_module: L.LightningModule, current_epoch: int, optimizer: Optimizer) -> None:
        if current_epoch != self.unfreeze_at_epoch or self.unfreeze_at_epoch == 0:
            return
        self.make_trainable(pl_module.net)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = [p for p in pl_module.net.parameters() if id(p) not in in_optimizer]
        lr = optimizer.param_groups[0]["lr"] * self.backbone_lr_factor
        optimizer.add_param_group({"params": params, "lr": lr})
        for config in pl_module.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, LambdaLR):
                config.scheduler.base_lrs.append(config.scheduler.base_lrs[0] * self.backbone_lr_factor)
                config.scheduler.lr_lambdas.append(config.scheduler.lr_lambdas[0])
        log.info("Epoch %d: backbone unfrozen (%d tensors) at lr %.3g", current_epoch, len(params), lr)
