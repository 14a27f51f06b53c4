"""SageMaker Debugger's built-in rules, with SageMaker's names and default parameters.

Each rule is fed through the hooks it defines, by :class:`~dogbreed.callbacks.debugger.Debugger` while
training or by anything that replays recorded data:

- ``on_fit_start(step, context)``: ``context["class_counts"]`` (training images per class), ``class_names``;
- ``on_train_loss(step, loss)``: every training step, in order;
- ``on_train_input(step, batch)``: training inputs while ``wants_inputs`` is true;
- ``on_train_tensors(step, stats)``: per-layer reductions (``{"gradients/net.fc.weight": {"mean": ..}}``)
  every ``save_interval`` steps and at the steps a rule asks for with ``wants_step``;
- ``on_gradients(step, grads)``, ``on_relu_output(step, name, output)``, ``on_update_ratios(step, ratios)``:
  raw tensors on those same steps;
- ``on_predictions(step, predictions, labels)``: validation batches;
- ``on_validation_end(step, train_loss, val_loss)``: after each validation round (mean losses);
- ``on_fit_end(step)``: last chance to judge what was accumulated.

A hook returns a one-line reason when the rule fires.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

from dogbreed.rules.base import ERROR, ISSUES, NO_ISSUES, Rule, RuleResult, build_rules

log = logging.getLogger(__name__)

__all__ = [
    "RULES",
    "CheckInputImages",
    "ClassImbalance",
    "DeadRelu",
    "DebuggerRule",
    "ExplodingTensor",
    "LossNotDecreasing",
    "Overfit",
    "Overtraining",
    "PoorWeightInitialization",
    "VanishingGradient",
    "WeightUpdateRatio",
    "build_debugger_rules",
]


class DebuggerRule(Rule):
    """Base of the debugger rules: keeps the first firing and turns the rule's own failures into ``Error``.

    Subclasses set ``name``, ``recommendation`` and the hooks they need; a hook returns a reason string
    when the rule fires and ``None`` otherwise. After the first firing (or an error) the rule stays quiet.

    Args:
        stop_training_on_fire: Ask the trainer to stop after the step where the rule fired (Lightning honours
            it once ``trainer.min_epochs`` are done, as for early stopping).
    """

    kind = "debugger"
    _state = ("result", "fired_now")

    def __init__(self, *, stop_training_on_fire: bool = False) -> None:
        self.stop_training_on_fire = stop_training_on_fire
        self.result = RuleResult(self.name, self.kind, recommendation="", parameters=self.parameters())
        self.fired_now = False

    @property
    def done(self) -> bool:
        return self.result.status in (ISSUES, ERROR)

    def fire(self, step: int | None, reason: str) -> None:
        self.result.status = ISSUES
        self.result.step = step
        self.result.message = reason
        self.result.recommendation = self.recommendation
        self.fired_now = True
        log.warning("Rule %s: IssuesFound at step %s: %s", self.name, step, reason)

    def call(self, hook: str, step: int | None, *args: Any) -> None:
        """Run ``self.<hook>(step, *args)`` unless the rule is done; record a firing or an error."""
        if self.done:
            return
        try:
            reason = getattr(self, hook)(step, *args)
        except Exception as err:  # a broken rule must not break training; it reports Error instead
            self.result.status = ERROR
            self.result.step = step
            self.result.message = f"the rule failed in {hook}: {type(err).__name__}: {err}"
            log.exception("Rule %s failed", self.name)
            return
        if reason:
            self.fire(step, reason)

    def set_message(self, message: str) -> None:
        """A note on a rule that did not fire (what it checked, or why it could not judge)."""
        if self.result.status == NO_ISSUES:
            self.result.message = message


class VanishingGradient(DebuggerRule):
    """Fires when the mean absolute gradient of a layer drops below ``threshold``."""

    name = "vanishing_gradient"
    recommendation = (
        "Gradients vanish before reaching the early layers: check for zero or tiny initialisation (use Kaiming "
        "init for ReLU networks), saturated activations or a too-low learning rate; residual connections and "
        "BatchNorm help deep networks."
    )

    def __init__(self, threshold: float = 1e-7, **kwargs: Any) -> None:
        self.threshold = threshold
        super().__init__(**kwargs)

    def on_train_tensors(self, step: int, stats: dict[str, dict[str, float]]) -> str | None:
        vanished = {
            n: s["abs_mean"]
            for n, s in stats.items()
            if n.startswith("gradients/") and math.isfinite(s["abs_mean"]) and s["abs_mean"] < self.threshold
        }
        if vanished:
            name, value = min(vanished.items(), key=lambda kv: kv[1])
            return (
                f"{len(vanished)} gradient tensor(s) with mean |grad| < {self.threshold:g}, e.g. "
                f"{name.removeprefix('gradients/')} ({value:.3g})"
            )
        return None


class ExplodingTensor(DebuggerRule):
    """Fires on the first NaN (or, unless ``only_nan``, infinite) loss, gradient or weight."""

    name = "exploding_tensor"
    recommendation = (
        "Values became NaN/Inf: lower the learning rate (model.lr), add gradient clipping "
        "(trainer.gradient_clip_val=1.0), check the inputs for NaNs, and prefer bf16 over fp16 mixed precision."
    )

    def __init__(self, only_nan: bool = False, **kwargs: Any) -> None:
        self.only_nan = only_nan
        super().__init__(**kwargs)

    def _bad(self, value: float) -> bool:
        return math.isnan(value) or (not self.only_nan and math.isinf(value))

    def on_train_loss(self, step: int, loss: float) -> str | None:
        return f"the training loss is {loss}" if self._bad(loss) else None

    def on_train_tensors(self, step: int, stats: dict[str, dict[str, float]]) -> str | None:
        bad = [n for n, s in stats.items() if n.startswith(("gradients/", "weights/")) and self._bad(s["l2"])]
        return f"{len(bad)} weight/gradient tensor(s) hold NaN/Inf, e.g. {bad[0]}" if bad else None


class LossNotDecreasing(DebuggerRule):
    """Fires when the mean training loss of the last ``patience`` x ``num_steps`` steps is not ``diff_percent`` %
    below the mean of the same number of steps before them, or is ``increase_threshold_percent`` % above it.

    Checked every ``num_steps`` steps. SageMaker compares single steps ``num_steps`` apart; mini-batch losses
    vary by far more than 0.1 % from noise alone, so that fires on healthy runs. Comparing means of two
    ``patience x num_steps`` blocks (``patience`` is our addition, default 10: blocks of 100 steps) keeps the
    noise below the signal while the loss still falls.
    """

    name = "loss_not_decreasing"
    recommendation = (
        "The training loss stalled: if it is early in training, raise the learning rate or check that the "
        "labels match the images; if it is late, training has converged, so stop earlier (early stopping) or "
        "decay the learning rate. A rising loss calls for a lower learning rate."
    )

    def __init__(
        self, num_steps: int = 10, diff_percent: float = 0.1, increase_threshold_percent: float = 5,
        patience: int = 10, **kwargs: Any,
    ) -> None:  # fmt: skip
        if num_steps < 1 or patience < 1:
            raise ValueError(
                f"loss_not_decreasing.num_steps and patience must be >= 1, got {num_steps} and {patience}."
            )
        self.num_steps = num_steps
        self.diff_percent = diff_percent
        self.increase_threshold_percent = increase_threshold_percent
        self.patience = patience
        super().__init__(**kwargs)
        self._window: list[float] = []
        self._means: list[float] = []

    def on_train_loss(self, step: int, loss: float) -> str | None:
        if not math.isfinite(loss):
            return None
        self._window.append(loss)
        if len(self._window) < self.num_steps:
            return None
        self._means.append(sum(self._window) / len(self._window))
        self._window.clear()
        block = self.patience
        if len(self._means) < 2 * block:
            return None
        recent = sum(self._means[-block:]) / block
        before = sum(self._means[-2 * block : -block]) / block
        decrease = (before - recent) / abs(before) * 100 if before else 0.0
        span = block * self.num_steps
        if decrease < -self.increase_threshold_percent:
            return f"the mean loss of the last {span} steps ({recent:.4g}) rose {-decrease:.1f}% over the {span} before"
        if decrease < self.diff_percent:
            return (
                f"the mean loss of the last {span} steps ({recent:.4g}) is {decrease:+.2f}% below the {span} before "
                f"({before:.4g}): less than the required {self.diff_percent:g}% decrease"
            )
        return None


class Overfit(DebuggerRule):
    """Fires when ``(val_loss - train_loss) / train_loss > ratio_threshold`` for more than ``patience`` validation
    rounds in a row (SageMaker: the ratio "is allowed to exceed" the threshold for ``patience`` steps).

    The losses are the validation mean and the training mean since the previous validation.
    """

    name = "overfit"
    recommendation = (
        "Validation loss is well above the training loss: the model memorises the training set. Add data "
        "augmentation, weight decay (model.weight_decay) or label smoothing, start from pretrained weights, or "
        "stop earlier."
    )

    def __init__(self, start_step: int = 0, patience: int = 1, ratio_threshold: float = 0.1, **kwargs: Any) -> None:
        self.start_step = start_step
        self.patience = patience
        self.ratio_threshold = ratio_threshold
        super().__init__(**kwargs)
        self._count = 0

    def on_validation_end(self, step: int, train_loss: float | None, val_loss: float) -> str | None:
        if step < self.start_step or train_loss is None or train_loss <= 0:
            return None
        ratio = (val_loss - train_loss) / train_loss
        self._count = self._count + 1 if ratio > self.ratio_threshold else 0
        if self._count > self.patience:
            return (
                f"validation loss {val_loss:.4g} vs training loss {train_loss:.4g}: ratio {ratio:.2f} > "
                f"{self.ratio_threshold:g} for {self._count} validation round(s)"
            )
        return None


class Overtraining(DebuggerRule):
    """Fires when the training loss (``patience_train``) or validation loss (``patience_validation``) stops
    improving by ``delta``.

    Patience counts validation rounds: the training loss compared is its mean since the previous round,
    because single batches are too noisy to compare one by one.
    """

    name = "overtraining"
    recommendation = (
        "The losses stopped improving: further epochs only fit noise. Use early stopping on val/loss or val/acc "
        "(callbacks.early_stopping.patience), reduce trainer.max_epochs, or decay the learning rate."
    )

    def __init__(
        self, patience_train: int = 5, patience_validation: int = 10, delta: float = 0.01, **kwargs: Any
    ) -> None:
        self.patience_train = patience_train
        self.patience_validation = patience_validation
        self.delta = delta
        super().__init__(**kwargs)
        self._best = {"train": math.inf, "val": math.inf}
        self._since = {"train": 0, "val": 0}

    def _update(self, key: str, value: float | None) -> int:
        if value is None or not math.isfinite(value):
            return self._since[key]
        if value < self._best[key] - self.delta:
            self._best[key] = value
            self._since[key] = 0
        else:
            self._since[key] += 1
        return self._since[key]

    def on_validation_end(self, step: int, train_loss: float | None, val_loss: float) -> str | None:
        train_since = self._update("train", train_loss)
        val_since = self._update("val", val_loss)
        if val_since >= self.patience_validation:
            best = self._best["val"]
            return f"validation loss has not improved by {self.delta:g} for {val_since} rounds (best {best:.4g})"
        if train_since >= self.patience_train:
            best = self._best["train"]
            return f"training loss has not improved by {self.delta:g} for {train_since} rounds (best {best:.4g})"
        return None


class PoorWeightInitialization(DebuggerRule):
    """Checks the first ``steps`` steps: ReLU-input variances across layers differ more than ``threshold`` x,
    the 5th-95th percentile spread of all gradients is below ``distribution_range``, or the loss does not
    improve for ``patience`` steps.
    """

    name = "poor_weight_initialization"
    recommendation = (
        "The network starts badly: layers see very different activation scales or gradients are all near zero. "
        "Use Kaiming (He) init for ReLU layers (never zeros), keep BatchNorm, or start from pretrained weights "
        "(model.weights=IMAGENET1K_V1); a new head is best initialised with small random weights, not zeros."
    )

    def __init__(
        self, threshold: float = 10.0, distribution_range: float = 0.001, patience: int = 5, steps: int = 10,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        self.threshold = threshold
        self.distribution_range = distribution_range
        self.patience = patience
        self.steps = steps
        super().__init__(**kwargs)
        self._best_loss = math.inf
        self._since = 0

    def wants_step(self, step: int) -> bool:
        return step < self.steps

    def on_train_tensors(self, step: int, stats: dict[str, dict[str, float]]) -> str | None:
        if step >= self.steps:
            return None
        variances = {n: s["std"] ** 2 for n, s in stats.items() if n.startswith("relu_input/")}
        variances = {n: v for n, v in variances.items() if math.isfinite(v)}
        if len(variances) < 2:
            return None
        low_name, low = min(variances.items(), key=lambda kv: kv[1])
        high_name, high = max(variances.items(), key=lambda kv: kv[1])
        if high > self.threshold * low:
            ratio = high / low if low > 0 else math.inf
            return (
                f"ReLU-input variance differs {ratio:.3g}x across layers ({low_name.removeprefix('relu_input/')}: "
                f"{low:.3g}, {high_name.removeprefix('relu_input/')}: {high:.3g}; threshold {self.threshold:g}x)"
            )
        return None

    def on_gradients(self, step: int, grads: dict[str, torch.Tensor]) -> str | None:
        if step >= self.steps or not grads:
            return None
        # a fixed-size sample of every layer's gradient values keeps the percentiles cheap
        samples = [g.detach().flatten()[:: max(1, g.numel() // 4096)].float().cpu() for g in grads.values()]
        values = torch.cat(samples)
        if not torch.isfinite(values).all():
            return None
        p5, p95 = torch.quantile(values, torch.tensor([0.05, 0.95])).tolist()
        if p95 - p5 < self.distribution_range:
            spread = p95 - p5
            return f"gradients are concentrated: 5th-95th percentile spread {spread:.3g} < {self.distribution_range:g}"
        return None

    def on_train_loss(self, step: int, loss: float) -> str | None:
        if step >= self.steps or not math.isfinite(loss):
            return None
        if loss < self._best_loss:
            self._best_loss, self._since = loss, 0
            return None
        self._since += 1
        if self._since >= self.patience:
            best = self._best_loss
            return f"the loss did not improve for {self._since} steps of the first {self.steps} (best {best:.4g})"
        return None


class DeadRelu(DebuggerRule):
    """Fires when more than ``threshold_layer`` % of a ReLU layer's channels are active on less than
    ``threshold_inactivity`` % of their inputs.
    """

    name = "dead_relu"
    recommendation = (
        "Many ReLU units never activate, so they stop learning: lower the learning rate, avoid large negative "
        "biases and zero/negative initialisation, or use LeakyReLU/GELU."
    )

    def __init__(self, threshold_inactivity: float = 1.0, threshold_layer: float = 50.0, **kwargs: Any) -> None:
        self.threshold_inactivity = threshold_inactivity
        self.threshold_layer = threshold_layer
        super().__init__(**kwargs)

    def on_relu_output(self, step: int, name: str, output: torch.Tensor) -> str | None:
        if output.ndim < 2:
            return None
        dims = [d for d in range(output.ndim) if d != 1]
        activity = (output.detach() > 0).float().mean(dim=dims) * 100
        dead = float((activity < self.threshold_inactivity).float().mean()) * 100
        if dead > self.threshold_layer:
            return (
                f"{dead:.0f}% of the channels of {name} are dead (active < {self.threshold_inactivity:g}% of the time)"
            )
        return None


class ClassImbalance(DebuggerRule):
    """Fires when the largest training class has more than ``threshold_imbalance`` x the images of the smallest,
    or when a class is mispredicted more than ``threshold_misprediction`` of the time in the last validation
    (judged once ``samples`` validation labels were seen).
    """

    name = "class_imbalance"
    recommendation = (
        "Some classes dominate the training set or are mostly mispredicted: collect more images of the rare "
        "classes, oversample them (a weighted sampler) or weight the loss by inverse class frequency."
    )

    def __init__(
        self, threshold_imbalance: float = 10, threshold_misprediction: float = 0.7, samples: int = 500, **kwargs: Any
    ) -> None:
        self.threshold_imbalance = threshold_imbalance
        self.threshold_misprediction = threshold_misprediction
        self.samples = samples
        super().__init__(**kwargs)
        self._names: list[str] = []
        self._seen = 0
        self._epoch: dict[int, list[int]] = {}
        self._last: dict[int, list[int]] = {}

    def on_fit_start(self, step: int, context: dict[str, Any]) -> str | None:
        counts = context.get("class_counts")
        self._names = list(context.get("class_names") or [])
        if not counts:
            self.set_message("no class counts from the datamodule; only mispredictions are checked")
            return None
        largest, smallest = max(counts), min(counts)
        ratio = largest / smallest if smallest else math.inf
        self.set_message(f"largest/smallest training class: {ratio:.2f}")
        if ratio > self.threshold_imbalance:
            big, small = self._label(counts.index(largest)), self._label(counts.index(smallest))
            return (
                f"class imbalance {ratio:.1f}x > {self.threshold_imbalance:g}: {big} has {largest} training images, "
                f"{small} has {smallest}"
            )
        return None

    def _label(self, index: int) -> str:
        return self._names[index] if index < len(self._names) else f"class {index}"

    def on_predictions(self, step: int, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        for label, correct in zip(labels.tolist(), (predictions == labels).tolist(), strict=True):
            total_wrong = self._epoch.setdefault(label, [0, 0])
            total_wrong[0] += 1
            total_wrong[1] += not correct
        self._seen += len(labels)

    def on_validation_end(self, step: int, train_loss: float | None, val_loss: float) -> None:
        self._last, self._epoch = self._epoch, {}

    def on_fit_end(self, step: int) -> str | None:
        if self._seen < self.samples:
            return None
        worst = max(self._last.items(), key=lambda kv: kv[1][1] / kv[1][0], default=None)
        if worst is None:
            return None
        label, (total, wrong) = worst
        if wrong / total > self.threshold_misprediction:
            self.recommendation = (
                "A class is mostly mispredicted: see which classes it is confused with (the report's confusion "
                "matrix); if it is rare in training, oversample it or weight the loss; if it looks like another "
                "class, it needs more (and more varied) images or a higher input resolution."
            )
            return (
                f"{self._label(label)} is mispredicted {wrong}/{total} times ({wrong / total:.0%} > "
                f"{self.threshold_misprediction:.0%}) in the last validation"
            )
        return None


class WeightUpdateRatio(DebuggerRule):
    """Fires when ``|update| / (|weight| + epsilon)`` of a weight tensor is above ``large_threshold`` or below
    ``small_threshold`` (L2 norms over one optimiser step).
    """

    name = "weight_update_ratio"
    recommendation = (
        "Weight updates are out of proportion to the weights: a ratio far above 1e-3 means the learning rate is "
        "too high (lower model.lr, add warm-up), a tiny one means it is too low or the layer is stuck."
    )

    def __init__(
        self, large_threshold: float = 10.0, small_threshold: float = 1e-8, epsilon: float = 1e-9, **kwargs: Any
    ) -> None:
        self.large_threshold = large_threshold
        self.small_threshold = small_threshold
        self.epsilon = epsilon
        super().__init__(**kwargs)

    def on_update_ratios(self, step: int, norms: dict[str, tuple[float, float]]) -> str | None:
        ratios = {n: update / (weight + self.epsilon) for n, (update, weight) in norms.items()}
        ratios = {n: r for n, r in ratios.items() if math.isfinite(r)}
        if not ratios:
            return None
        high_name, high = max(ratios.items(), key=lambda kv: kv[1])
        low_name, low = min(ratios.items(), key=lambda kv: kv[1])
        if high > self.large_threshold:
            return f"update/weight ratio {high:.3g} > {self.large_threshold:g} for {high_name}"
        if low < self.small_threshold:
            return f"update/weight ratio {low:.3g} < {self.small_threshold:g} for {low_name}"
        return None


class CheckInputImages(DebuggerRule):
    """Fires when the per-channel mean of the first ``threshold_samples`` normalised training images is more
    than ``threshold_mean`` away from 0.
    """

    name = "check_input_images"
    recommendation = (
        "Inputs are not normalised to zero mean: set data.mean and data.std to the training set's per-channel "
        "statistics (ImageNet's for ImageNet-pretrained weights)."
    )

    def __init__(self, threshold_mean: float = 0.2, threshold_samples: int = 500, channel: int = 1, **kwargs: Any):
        self.threshold_mean = threshold_mean
        self.threshold_samples = threshold_samples
        self.channel = channel
        super().__init__(**kwargs)
        self._sum: torch.Tensor | None = None
        self._count = 0

    @property
    def wants_inputs(self) -> bool:
        return not self.done and self._count < self.threshold_samples

    def on_train_input(self, step: int, images: torch.Tensor) -> str | None:
        if images.ndim < 2:
            return None
        dims = [d for d in range(images.ndim) if d != self.channel]
        # mean per image and channel, summed over the batch: the dataset mean is their average
        per_image = images.detach().float().mean(dim=[d for d in dims if d != 0])
        batch_sum = per_image.sum(dim=0).cpu()
        self._sum = batch_sum if self._sum is None else self._sum + batch_sum
        self._count += images.shape[0]
        if self._count < self.threshold_samples:
            return None
        means = self._sum / self._count
        self.set_message(f"per-channel input mean over {self._count} images: {[round(m, 3) for m in means.tolist()]}")
        worst = float(means.abs().max())
        if worst > self.threshold_mean:
            return (
                f"input mean per channel {[round(m, 3) for m in means.tolist()]} over {self._count} images: "
                f"|mean| {worst:.2f} > {self.threshold_mean:g}"
            )
        return None

    def on_fit_end(self, step: int) -> None:
        if self._count < self.threshold_samples:
            self.set_message(f"only {self._count} training images seen (< threshold_samples={self.threshold_samples})")


RULES = {
    cls.name: cls
    for cls in (
        VanishingGradient, ExplodingTensor, LossNotDecreasing, Overfit, Overtraining, PoorWeightInitialization,
        DeadRelu, ClassImbalance, WeightUpdateRatio, CheckInputImages,
    )
}  # fmt: skip


def build_debugger_rules(config: Mapping[str, Any] | None) -> list[DebuggerRule]:
    """``callbacks.debugger.rules`` -> rule objects (see :func:`~dogbreed.rules.base.build_rules`)."""
    return build_rules(RULES, config, "callbacks.debugger.rules")
