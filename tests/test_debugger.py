"""Debugger rules on real (small) runs: each fires on a deliberately broken run and stays quiet on the demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import open_dict
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dogbreed.callbacks import Debugger
from dogbreed.rules import ISSUES, NO_ISSUES, RULES
from dogbreed.rules.debugger import ClassImbalance
from dogbreed.rundir import load_trial

from .conftest import compose_config, make_small, write_image_folder


class TinyClassifier(L.LightningModule):
    """A 3-layer MLP over 3x8x8 "images": the same hooks as the real model, in milliseconds per step."""

    def __init__(self, num_classes: int = 4, lr: float = 1e-2, init: str = "default", optimizer: str = "adamw"):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, num_classes)
        )
        if init == "zeros":
            for p in self.net.parameters():
                nn.init.zeros_(p)
        elif init == "dead":  # a large negative bias: the first ReLU never fires
            nn.init.constant_(self.net[1].bias, -100.0)
        self.criterion = nn.CrossEntropyLoss()
        self.lr, self.optimizer = lr, optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.criterion(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", self.criterion(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def tensors(n: int, num_classes: int = 4, seed: int = 0, mean: float = 0.0) -> TensorDataset:
    """Random normalised "images" (or shifted by ``mean``) with random labels."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g) + mean, torch.randint(0, num_classes, (n,), generator=g))


def tiny_fit(
    callbacks: list[L.Callback],
    model: L.LightningModule | None = None,
    train: Dataset | None = None,
    val: Dataset | None = None,
    epochs: int = 1,
    batch_size: int = 16,
    shuffle: bool = True,
) -> L.Trainer:
    """Fit ``model`` (a default TinyClassifier) on CPU without checkpoints, loggers or progress bars."""
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    train_loader = DataLoader(train or tensors(64), batch_size=batch_size, shuffle=shuffle)
    val_loader = DataLoader(val, batch_size=batch_size) if val is not None else None
    trainer.fit(model or TinyClassifier(), train_loader, val_loader)
    return trainer


def run_rules(tmp_path: Path, rules: dict[str, Any], save_interval: int = 1, **fit: Any) -> dict[str, dict[str, Any]]:
    """Fit with a Debugger that runs ``rules``; return ``rule-results.json`` by rule name."""
    debugger = Debugger(run_dir=tmp_path, save_interval=save_interval, rules=rules)
    tiny_fit([debugger], **fit)
    results = json.loads((tmp_path / "debug-output" / "rule-results.json").read_text())
    return {r["name"]: r for r in results}


@pytest.fixture(scope="module")
def demo_rules(debug_demo_run: Path) -> dict[str, dict[str, Any]]:
    results = json.loads((debug_demo_run / "debug-output" / "rule-results.json").read_text())
    return {r["name"]: r for r in results}


# ---- the healthy demo ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("rule", sorted(RULES))
def test_demo_run_has_no_issues(demo_rules: dict[str, dict[str, Any]], rule: str) -> None:
    assert demo_rules[rule]["status"] == NO_ISSUES, demo_rules[rule]


@pytest.mark.slow
def test_demo_run_judged_the_inputs_and_classes(demo_rules: dict[str, dict[str, Any]]) -> None:
    """The quiet verdicts are real checks, not "not enough data"."""
    assert "over 512 images" in demo_rules["check_input_images"]["message"]
    assert "largest/smallest training class: 1.00" in demo_rules["class_imbalance"]["message"]


@pytest.mark.slow
def test_load_trial_reads_the_demo_run(debug_demo_run: Path) -> None:
    trial = load_trial(debug_demo_run)
    assert trial.steps("train") == [*range(10), 16, 32]  # poor_weight_initialization asks for steps 0-9 too
    assert {"weights", "gradients", "activations", "relu_input"} == {n.split("/")[0] for n in trial.tensor_names()}
    steps, norms = trial.tensor("gradients/net.fc.weight", "l2")
    assert list(steps) == [0, 16, 32] and (norms > 0).all()  # full saves; steps 1-9 keep ReLU inputs only
    loss_steps, losses = trial.loss("train")
    assert list(loss_steps) == list(range(48)) and losses[-8:].mean() < losses[:8].mean()
    assert trial.loss("eval")[0].size == 6  # 3 validations x 2 batches
    assert trial.steps("eval") == [0]  # every 10th validation step
    with pytest.raises(KeyError, match="tensor_names"):
        trial.tensor("gradients/no.such.layer")


# ---- deliberately broken runs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero_init_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    rules = {"vanishing_gradient": {}, "poor_weight_initialization": {}, "dead_relu": {}}
    return run_rules(tmp_path_factory.mktemp("zeros"), rules, model=TinyClassifier(init="zeros"))


def test_vanishing_gradient_fires_on_zero_init(zero_init_results: dict[str, dict[str, Any]]) -> None:
    result = zero_init_results["vanishing_gradient"]
    assert result["status"] == ISSUES and result["step"] == 0
    assert "net.1.weight" in result["message"] and result["recommendation"]


def test_poor_weight_initialization_fires_on_zero_init(zero_init_results: dict[str, dict[str, Any]]) -> None:
    result = zero_init_results["poor_weight_initialization"]
    assert result["status"] == ISSUES and result["step"] == 0
    assert "Kaiming" in result["recommendation"]


def test_dead_relu_fires_on_zero_init(zero_init_results: dict[str, dict[str, Any]]) -> None:
    result = zero_init_results["dead_relu"]
    assert result["status"] == ISSUES and "100% of the channels of net.2" in result["message"]


def test_dead_relu_fires_on_negative_bias(tmp_path: Path) -> None:
    results = run_rules(tmp_path, {"dead_relu": {}, "vanishing_gradient": {}}, model=TinyClassifier(init="dead"))
    assert results["dead_relu"]["status"] == ISSUES
    assert results["vanishing_gradient"]["status"] == ISSUES  # nothing flows back through dead units


def test_exploding_tensor_fires_and_stops_training(tmp_path: Path) -> None:
    debugger = Debugger(run_dir=tmp_path, rules={"exploding_tensor": {"stop_training_on_fire": True}})
    trainer = tiny_fit([debugger], model=TinyClassifier(lr=1e30, optimizer="sgd"), epochs=5)
    result = debugger.rules[0].result
    assert result.status == ISSUES and "NaN/Inf" in result.message
    assert trainer.global_step == result.step + 1 < 20  # stopped at the step that fired, not after 5 epochs


def test_loss_not_decreasing_fires_when_nothing_learns(tmp_path: Path) -> None:
    one_batch = tensors(16)
    rules = {"loss_not_decreasing": {"num_steps": 5, "patience": 2}}  # blocks of 10 steps, not 100
    results = run_rules(tmp_path, rules, model=TinyClassifier(lr=0.0), train=one_batch, epochs=25)
    result = results["loss_not_decreasing"]
    assert result["status"] == ISSUES and result["step"] == 19  # the end of the second 10-step block
    assert "0.00% below the 10 before" in result["message"]


@pytest.fixture(scope="module")
def memorising_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """64 random-label samples for 20 epochs: the model memorises them and validation gets worse."""
    rules = {"overfit": {}, "overtraining": {}, "loss_not_decreasing": {}}
    return run_rules(
        tmp_path_factory.mktemp("memorise"), rules, model=TinyClassifier(lr=3e-2), train=tensors(64, seed=1),
        val=tensors(64, seed=2), epochs=20, save_interval=1000, batch_size=32,
    )  # fmt: skip


def test_overfit_fires_when_memorising(memorising_results: dict[str, dict[str, Any]]) -> None:
    result = memorising_results["overfit"]
    assert result["status"] == ISSUES and "validation loss" in result["message"]


def test_overtraining_fires_when_memorising(memorising_results: dict[str, dict[str, Any]]) -> None:
    result = memorising_results["overtraining"]
    assert result["status"] == ISSUES and "loss has not improved by 0.01" in result["message"]


@pytest.mark.parametrize(("lr", "side"), [(1e3, ">"), (1e-13, "<")])
def test_weight_update_ratio_fires_on_extreme_learning_rates(tmp_path: Path, lr: float, side: str) -> None:
    results = run_rules(tmp_path, {"weight_update_ratio": {}}, model=TinyClassifier(lr=lr))
    result = results["weight_update_ratio"]
    assert result["status"] == ISSUES and "ratio" in result["message"] and f" {side} " in result["message"]


def test_check_input_images_fires_on_unnormalised_inputs(tmp_path: Path) -> None:
    results = run_rules(tmp_path, {"check_input_images": {}}, train=tensors(512, mean=0.5), batch_size=64)
    result = results["check_input_images"]
    assert result["status"] == ISSUES and result["step"] == 7  # after 8 batches of 64 = threshold_samples
    assert "0.5" in result["message"]


def test_check_input_images_quiet_on_normalised_inputs(tmp_path: Path) -> None:
    results = run_rules(tmp_path, {"check_input_images": {}}, train=tensors(512), batch_size=64)
    assert results["check_input_images"]["status"] == NO_ISSUES


def test_class_imbalance_fires_on_a_one_class_dominated_dataset(demo_cfg, tmp_path: Path) -> None:
    """A real run of the demo model on 22 images of one class and 2 of the other."""
    source = tmp_path / "imbalanced"
    write_image_folder(source, classes=["001.Common"], counts={"train": 22, "valid": 2, "test": 2})
    write_image_folder(source, classes=["002.Rare"], counts={"train": 2, "valid": 2, "test": 2}, seed=1)
    with open_dict(demo_cfg):
        demo_cfg.data.update(source=str(source), num_classes=2, batch_size=8, image_size=28, resize_size=32)
        demo_cfg.callbacks.debugger.rules = {"class_imbalance": {}}
        demo_cfg.callbacks.pop("profiler")
        demo_cfg.update(test=False, report=False)
    from dogbreed.train import train

    train(demo_cfg)
    results = json.loads((tmp_path / "run" / "debug-output" / "rule-results.json").read_text())
    assert results[0]["status"] == ISSUES
    assert results[0]["message"].startswith("class imbalance 11.0x > 10: Common has 22 training images, Rare has 2")


def test_class_imbalance_fires_on_mispredicted_class() -> None:
    rule = ClassImbalance(samples=10)
    rule.call("on_fit_start", 0, {"class_counts": [10, 10], "class_names": ["a", "b"]})
    rule.call("on_predictions", 5, torch.tensor([0, 0, 0, 0, 0, 0]), torch.tensor([0, 0, 0, 1, 1, 1]))
    rule.call("on_validation_end", 5, 1.0, 1.0)
    rule.call("on_predictions", 9, torch.tensor([0, 0, 0, 0, 0, 0]), torch.tensor([0, 0, 0, 1, 1, 1]))
    rule.call("on_validation_end", 9, 1.0, 1.0)
    rule.call("on_fit_end", 10)
    assert rule.result.status == ISSUES and "b is mispredicted 3/3 times" in rule.result.message


# ---- rule plumbing ---------------------------------------------------------------------------------------------
def test_a_failing_rule_reports_error_and_training_goes_on(tmp_path: Path) -> None:
    debugger = Debugger(run_dir=tmp_path, rules={"vanishing_gradient": {}})

    def broken(step: int, stats: dict) -> None:
        raise RuntimeError("boom")

    debugger.rules[0].on_train_tensors = broken
    trainer = tiny_fit([debugger])
    assert trainer.global_step == 4
    result = debugger.rules[0].result
    assert result.status == "Error" and "RuntimeError: boom" in result.message


def test_unknown_rule_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match=r"unknown rule 'vanishing_gradients'.*vanishing_gradient"):
        Debugger(rules={"vanishing_gradients": {}})


def test_every_rule_is_configurable_from_the_config(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    cfg = compose_config(["experiment=demo", "callbacks.debugger.rules.overfit.patience=3",
                          "callbacks.debugger.rules.dead_relu=false"])  # fmt: skip
    cfg = make_small(cfg, tmp_path)
    debugger = instantiate(cfg.callbacks.debugger)
    by_name = {r.name: r for r in debugger.rules}
    assert set(by_name) == set(RULES) - {"dead_relu"}
    assert by_name["overfit"].patience == 3
    for name, rule in by_name.items():  # every parameter in the YAML reaches the rule
        assert set(cfg.callbacks.debugger.rules[name]) <= set(rule.parameters()), name


def test_debugger_without_collection_costs_little(tmp_path: Path) -> None:
    """Steps that do not save keep no hooks attached."""
    debugger = Debugger(run_dir=tmp_path, save_interval=1000, rules={})
    model = TinyClassifier()
    tiny_fit([debugger], model=model)
    assert not debugger._handles
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
