"""scripts/gpu_check.sh on a machine without CUDA: it stops at once with one clear line and exit status 3."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
NO_CUDA = 3


@pytest.fixture
def bin_without_nvidia_smi(tmp_path: Path) -> Path:
    """A PATH folder linking every command on PATH except nvidia-smi (so a CI machine's own one is hidden too)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            link = folder / entry.name
            if entry.name != "nvidia-smi" and not link.exists() and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    return folder


def run(out: Path, path: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    done = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env={**os.environ, "PATH": str(path)}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    return done, time.monotonic() - start


def test_the_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_without_nvidia_smi_it_exits_3_at_once(tmp_path: Path, bin_without_nvidia_smi: Path) -> None:
    done, took = run(tmp_path / "out", bin_without_nvidia_smi)
    assert done.returncode == NO_CUDA, done.stderr
    assert done.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU here (nvidia-smi not found); nothing was run. Run it on a machine with an NVIDIA GPU."
    ]
    assert "no CUDA GPU here" in (tmp_path / "out" / "summary.md").read_text()
    assert took < 10


def test_a_failing_nvidia_smi_is_no_cuda_either(tmp_path: Path, bin_without_nvidia_smi: Path) -> None:
    fake = bin_without_nvidia_smi / "nvidia-smi"
    message = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    fake.write_text(f'#!/bin/sh\necho "{message}"\nexit 9\n')
    fake.chmod(0o755)
    done, took = run(tmp_path / "out", bin_without_nvidia_smi)
    assert done.returncode == NO_CUDA, done.stderr
    assert "nvidia-smi failed: NVIDIA-SMI has failed" in done.stderr and len(done.stderr.splitlines()) == 1
    assert took < 10


def test_it_needs_an_output_folder() -> None:
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: bash scripts/gpu_check.sh OUT_DIR" in done.stderr
