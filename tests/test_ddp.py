"""``trainer=ddp`` on CPUs: batch norm and precision that fit the accelerator, and a real 2-process run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import compose_config


def test_ddp_on_cpu_resolves_per_process_batchnorm_and_fp32() -> None:
    cpu = compose_config(["experiment=demo", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]).trainer
    assert (cpu.sync_batchnorm, cpu.precision) == (False, "32-true")
    gpu = compose_config(["trainer=ddp", "trainer.accelerator=gpu"]).trainer
    assert gpu.sync_batchnorm is True and gpu.precision in ("bf16-mixed", "16-mixed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_ddp_without_a_gpu_trains_on_cpu_processes() -> None:
    """What a multi-instance SageMaker job on CPU instances gets from the launcher's ``trainer=ddp``."""
    trainer = compose_config(["experiment=demo", "trainer=ddp", "trainer.num_nodes=2"]).trainer
    assert (trainer.sync_batchnorm, trainer.precision) == (False, "32-true")


@pytest.mark.slow
def test_ddp_trains_with_two_cpu_processes(tmp_path: Path) -> None:
    """One short epoch on 2 gloo processes (Lightning relaunches the command), then test and export on rank 0."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "dogbreed.train", "experiment=demo", "trainer=ddp", "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.max_epochs=1", "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=2", "data.num_workers=0", "data.cache=false", "report=false",
        "~callbacks.progress_bar", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "SyncBatchNorm" not in result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0 <= metrics["test/acc"] <= 1
    assert (run_dir / "model" / "model.pt").is_file()
    assert "distributed_backend=gloo" in result.stdout + result.stderr
