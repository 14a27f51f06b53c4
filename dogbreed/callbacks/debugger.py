"""``Debugger``: SageMaker Debugger's tensor collection and built-in rules as a Lightning callback.

Losses are kept every step; per-layer reductions of weights, gradients and activations every
``save_interval`` training steps (``eval_save_interval`` validation steps), written under
``<run>/debug-output/`` (format: :mod:`dogbreed.rundir`). Hooks are attached only on
the steps that save, and the other steps keep their losses on the device until the next flush, so
the default intervals cost a few percent of the step time. Step counters are in the checkpoint, so a
resumed run goes on numbering where its checkpoint was taken.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from dogbreed.rules import DebuggerRule, build_debugger_rules
from dogbreed.rundir import DEBUG_META, REDUCTIONS, RULE_RESULTS, DebugWriter

log = logging.getLogger(__name__)

ACTIVATION_TYPES = (nn.Conv2d, nn.Linear, nn.ReLU)


def reduce_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``[mean, std, abs_mean, l2, zeros]`` of a tensor, as one small tensor (one device sync per batch)."""
    t = tensor.detach().float()
    if t.numel() == 0:
        return torch.full((5,), float("nan"), device=t.device)
    std = t.std() if t.numel() > 1 else torch.zeros((), device=t.device)
    return torch.stack([t.mean(), std, t.abs().mean(), torch.linalg.vector_norm(t), (t == 0).float().mean()])


def stats_dict(values: Iterable[float]) -> dict[str, float]:
    """Name the values of :func:`reduce_tensor` as ``tensors.jsonl`` stores them."""
    return dict(zip(REDUCTIONS, (float(v) for v in values), strict=True))


class Debugger(Callback):
    """Collect tensors like smdebug and run SageMaker's built-in debugger rules during training.

    Args:
        run_dir: Where ``debug-output/`` goes; the trainer's ``default_root_dir`` when None.
        save_interval: Save per-layer reductions every this many training steps.
        eval_save_interval: Save activation reductions every this many validation steps.
        rules: Rule name -> parameters (SageMaker's defaults when empty); ``false`` turns a rule off, and
            ``stop_training_on_fire: true`` stops training at the step where the rule fires.
        collect_activations: Also save module outputs (Conv2d, Linear, ReLU) and ReLU inputs.
        flush_every: Copy buffered losses to the host every this many steps (rules see them then).
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        save_interval: int = 100,
        eval_save_interval: int = 10,
        rules: Mapping[str, Any] | None = None,
        collect_activations: bool = True,
        flush_every: int = 25,
    ) -> None:
        if save_interval < 1 or eval_save_interval < 1:
            raise ValueError(
                f"callbacks.debugger.save_interval and eval_save_interval must be >= 1, got {save_interval} and "
                f"{eval_save_interval}."
            )
        self.run_dir = run_dir
        self.save_interval = save_interval
        self.eval_save_interval = eval_save_interval
        self.rules = build_debugger_rules(rules)
        self.collect_activations = collect_activations
        self.flush_every = max(1, flush_every)
        if any(r.stop_training_on_fire for r in self.rules):
            self.flush_every = 1  # a rule that stops training must see every loss at once
        self.writer: DebugWriter | None = None
        self.step = 0
        self.eval_step = 0
        self._loaded: dict[str, Any] | None = None
        self._saving = False
        self._full = False  # a save_interval step (everything) rather than a step a rule asked for (ReLU inputs)
        self._mode = "train"  # which pass the hooks see: train or eval
        self._handles: list[Any] = []
        self._stats: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._loss_buffer: list[tuple[int, torch.Tensor]] = []
        self._eval_losses: list[tuple[int, torch.Tensor]] = []
        self._train_sum, self._train_n = 0.0, 0
        self._logits: torch.Tensor | None = None
        self._logits_handle: Any = None
        self._weights_before: dict[str, torch.Tensor] = {}

    # ---- helpers -------------------------------------------------------------------------------
    def _call(self, hook: str, *args: Any) -> None:
        for rule in self.rules:
            if hasattr(rule, hook):
                rule.call(hook, *args)

    def _rules_with(self, hook: str) -> list[DebuggerRule]:
        return [r for r in self.rules if hasattr(r, hook) and not r.done]

    def _attach(self, pl_module: L.LightningModule, full: bool = True) -> None:
        if not self.collect_activations:
            return
        self._calls = {}
        for name, module in pl_module.named_modules():
            if isinstance(module, ACTIVATION_TYPES) and name:
                if full:
                    self._handles.append(module.register_forward_hook(self._output_hook(name)))
                if isinstance(module, nn.ReLU):
                    self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _call_name(self, name: str, key: str) -> str:
        """``net.layer1.0.relu`` is called twice per block in a ResNet: the second call is ``...relu#1``."""
        count = self._calls.get(f"{key}/{name}", 0)
        self._calls[f"{key}/{name}"] = count + 1
        return name if count == 0 else f"{name}#{count}"

    def _input_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], torch.Tensor):
                self._stats[f"relu_input/{self._call_name(name, 'in')}"] = reduce_tensor(args[0])

        return hook

    def _output_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                return
            call_name = self._call_name(name, "out")
            self._stats[f"activations/{call_name}"] = reduce_tensor(output)
            if isinstance(module, nn.ReLU) and self._mode == "train":
                self._call("on_relu_output", self.step, call_name, output)

        return hook

    def _flush_losses(self) -> None:
        if self._loss_buffer:
            steps = [s for s, _ in self._loss_buffer]
            values = torch.stack([v.float() for _, v in self._loss_buffer]).cpu().tolist()
            self._loss_buffer.clear()
            if self.writer:
                self.writer.write_losses(
                    {"step": s, "mode": "train", "value": v} for s, v in zip(steps, values, strict=True)
                )
            for step, value in zip(steps, values, strict=True):
                self._train_sum += value
                self._train_n += 1
                self._call("on_train_loss", step, value)

    def _write_stats(self, step: int, mode: str) -> dict[str, dict[str, float]]:
        if not self._stats:
            return {}
        names = list(self._stats)
        values = torch.stack([self._stats[n].float() for n in names]).cpu().tolist()
        self._stats = {}
        stats = {n: stats_dict(v) for n, v in zip(names, values, strict=True)}
        if self.writer:
            self.writer.write_tensors(step, mode, stats)
        return stats

    def _maybe_stop(self, trainer: L.Trainer) -> None:
        for rule in self.rules:
            if rule.fired_now:
                rule.fired_now = False
                if rule.stop_training_on_fire:
                    log.warning("Stopping training: rule %s fired (stop_training_on_fire).", rule.name)
                    trainer.should_stop = True

    def write_results(self) -> None:
        if self.writer:
            self.writer.write_json(RULE_RESULTS, [r.result.to_dict() for r in self.rules])

    # ---- Lightning hooks -----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or self.writer is not None:
            return
        run_dir = Path(self.run_dir or trainer.default_root_dir)
        self.writer = DebugWriter(run_dir)
        log.info("Debugger: tensors and rule results in %s", self.writer.dir)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._loaded is not None:  # resuming: count on from the checkpoint, drop what was written past it
            self.step, self.eval_step = self._loaded["step"], self._loaded["eval_step"]
            self._loaded = None
            if self.writer:
                self.writer.drop_from(self.step, self.eval_step)
        context: dict[str, Any] = {"class_counts": None, "class_names": None}
        datamodule = getattr(trainer, "datamodule", None)
        index = getattr(datamodule, "index", None) if datamodule is not None else None
        if index is not None:
            context["class_counts"] = index.counts().get("train")
            context["class_names"] = index.class_names
        if self.writer:
            self.writer.write_json(
                DEBUG_META,
                {
                    "model": type(pl_module).__name__,
                    "save_interval": self.save_interval,
                    "eval_save_interval": self.eval_save_interval,
                    "rules": [r.name for r in self.rules],
                    **context,
                },
            )
        self._call("on_fit_start", self.step, context)
        self._maybe_stop(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._mode = "train"
        self._full = self.step % self.save_interval == 0
        self._saving = self._full or any(
            r.wants_step(self.step) for r in self.rules if hasattr(r, "wants_step") and not r.done
        )
        if self._saving:
            self._attach(pl_module, full=self._full)
        images = batch[0] if isinstance(batch, list | tuple) else None
        if isinstance(images, torch.Tensor):
            for rule in self.rules:
                if getattr(rule, "wants_inputs", False):
                    rule.call("on_train_input", self.step, images)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._saving:
            return
        self._detach()  # the backward pass ran; activations of this step are in
        grads = {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        if self._full:
            for name, grad in grads.items():
                self._stats[f"gradients/{name}"] = reduce_tensor(grad)
        if self._rules_with("on_gradients"):
            self._call("on_gradients", self.step, grads)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self._full and self._rules_with("on_update_ratios"):
            self._weights_before = {
                n: p.detach().clone()
                for n, p in pl_module.named_parameters()
                if p.grad is not None and n.endswith("weight")
            }

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._loss_buffer.append((self.step, loss.detach()))
        if self._saving:
            self._detach()
            params = dict(pl_module.named_parameters()) if self._full else {}
            for name, param in params.items():
                self._stats[f"weights/{name}"] = reduce_tensor(param)
            if self._weights_before:
                pairs = [
                    torch.stack(
                        [torch.linalg.vector_norm(params[n].detach() - before), torch.linalg.vector_norm(before)]
                    )
                    for n, before in self._weights_before.items()
                ]
                norms = torch.stack(pairs).cpu().tolist()
                self._call(
                    "on_update_ratios", self.step, dict(zip(self._weights_before, map(tuple, norms), strict=True))
                )
                self._weights_before = {}
            self._flush_losses()
            stats = self._write_stats(self.step, "train")
            self._call("on_train_tensors", self.step, stats)
            self._saving = False
        elif len(self._loss_buffer) >= self.flush_every:
            self._flush_losses()
        self._maybe_stop(trainer)
        self.step += 1

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._flush_losses()
        self._eval_losses = []

        def keep_logits(module: nn.Module, args: Any, output: Any) -> None:
            self._logits = output if isinstance(output, torch.Tensor) else None

        self._logits_handle = pl_module.register_forward_hook(keep_logits)

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.sanity_checking:
            return
        self._mode = "eval"
        self._saving = self._full = self.eval_step % self.eval_save_interval == 0
        if self._saving:
            self._attach(pl_module)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking:
            return
        if self._saving:
            self._detach()
            self._write_stats(self.eval_step, "eval")
            self._saving = False
        logits, labels = self._logits, batch[1] if isinstance(batch, list | tuple) and len(batch) > 1 else None
        if isinstance(logits, torch.Tensor) and isinstance(labels, torch.Tensor) and logits.ndim == 2:
            criterion = getattr(pl_module, "criterion", None) or nn.functional.cross_entropy
            self._eval_losses.append((self.eval_step, criterion(logits.detach(), labels)))
            self._call("on_predictions", self.step, logits.argmax(dim=1).cpu(), labels.cpu())
        self._logits = None
        self.eval_step += 1

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._logits_handle is None:
            return
        self._logits_handle.remove()
        self._logits_handle = None
        self._mode = "train"
        if not self._eval_losses:
            return
        values = torch.stack([v.float() for _, v in self._eval_losses]).cpu().tolist()
        if self.writer:
            self.writer.write_losses(
                {"step": s, "mode": "eval", "value": v, "train_step": self.step}
                for (s, _), v in zip(self._eval_losses, values, strict=True)
            )
        self._flush_losses()
        train_loss = self._train_sum / self._train_n if self._train_n else None
        self._train_sum, self._train_n = 0.0, 0
        self._call("on_validation_end", self.step, train_loss, sum(values) / len(values))
        self._eval_losses = []
        self._maybe_stop(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush_losses()
        self._call("on_fit_end", self.step)
        self.write_results()
        for rule in self.rules:
            log.info("Debugger rule %s: %s %s", rule.name, rule.result.status, rule.result.message)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._flush_losses()  # what led up to the checkpoint survives a kill

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "eval_step": self.eval_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict  # applied if this is a fit resuming; testing a checkpoint loads it too

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._detach()
        self._flush_losses()
        self.write_results()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.writer:
            self._detach()
            self.writer.close()
            self.writer = None
