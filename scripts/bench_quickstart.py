"""The quick start's wall time and accuracy: the README's demo against variants of it, measured in one run.

    flock /tmp/dogbreed-bench.lock python scripts/bench_quickstart.py [--avx2] [--repeats 1] [VARIANT ...]

Each row runs the README's command, ``python -m dogbreed.train experiment=demo``, in a process of its own with
the variant's overrides, and reads what the run wrote: ``metrics.json``'s ``wall_time_s`` (the "Done in" figure)
and ``test/acc``, and the profiler's ``steps.jsonl``, whose mean training step splits into data, forward,
backward and optimizer. Every figure is also printed as x the demo as configured, measured in the same run;
repeats alternate the order of the rows. A VARIANT is ``"name=override override"``, one argument (default: the rows
below).
``--avx2`` holds torch, oneDNN and MKL to their AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``), the laptop of the goal: under 150 s on a 2-core AVX2
machine with test/acc at least 0.75.
``--reference "ROW=SECONDS"`` names a row's wall time measured on another machine and adds each row's estimate
there (SECONDS x row / ROW, both measured here in this run). By default: the demo of commit 348ff4e, which took
472 s on a 2-core AMD EPYC with AVX2 only (issue 25), the one figure from such a machine this project has.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from dogbreed._io import cpu_description, read_jsonl
from dogbreed.rundir import METRICS, PROFILER_DIR, STEPS

ISSUE_25 = "demo of 348ff4e"
DEFAULT_VARIANTS = {
    "demo": [],
    "4 epochs, no label smoothing": ["trainer.max_epochs=4", "model.label_smoothing=0"],
    ISSUE_25: ["trainer.max_epochs=8", "data.image_size=56", "data.resize_size=64", "model.optimizer.fused=false",
               "model.label_smoothing=0"],
}  # fmt: skip
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
PHASES = ("dataloader", "forward", "backward", "optimizer")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write a variant as 'name=override override' ('big=data.batch_size=64')"
        )
    return name, shlex.split(overrides)


def parse_reference(text: str) -> tuple[str, float]:
    name, _, seconds = text.rpartition("=")
    try:
        if name:
            return name, float(seconds)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: write a reference as 'row=seconds' ('{ISSUE_25}=472')")


def run_demo(overrides: list[str], run_dir: Path, env: dict[str, str]) -> dict[str, float]:
    """One demo run in a fresh process; its wall time, test accuracy and mean step phases (ms)."""
    command = [sys.executable, "-m", "dogbreed.train", "experiment=demo", *overrides, f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, env=env, cwd=run_dir.parent, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((run_dir / METRICS).read_text())
    steps = read_jsonl(run_dir / PROFILER_DIR / STEPS)
    phases = {p: 1000 * statistics.fmean(s[p] or 0.0 for s in steps) for p in (*PHASES, "duration")}
    return {"wall": metrics["wall_time_s"], "acc": metrics["test/acc"]} | phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", type=parse_variant, help="'name=override override' (default: 5 rows)")
    parser.add_argument("--avx2", action="store_true", help="hold torch to AVX2 kernels, as on an AVX2-only laptop")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each row (order alternates)")
    parser.add_argument("--extra", default="", help="overrides for every row, space-separated (tests: small runs)")
    parser.add_argument("--reference", type=parse_reference, help=f"'row=seconds' elsewhere (default: {ISSUE_25}=472)")
    args = parser.parse_args()
    variants = dict(args.variants) or DEFAULT_VARIANTS
    variants = {"demo": [], **variants}  # the baseline of every ratio
    reference = args.reference or ((ISSUE_25, 472.0) if ISSUE_25 in variants else None)
    if reference and reference[0] not in variants:
        parser.error(f"--reference: no row named {reference[0]!r}; the rows: {', '.join(variants)}")
    extra = shlex.split(args.extra)
    env = os.environ | (AVX2 if args.avx2 else {})
    print(f"CPU: {cpu_description()}; torch kernels: {'held to AVX2' if args.avx2 else 'the CPU own best'}")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
            for name in order:
                run_dir = Path(tmp) / f"{len(results[name])}-{re.sub(r'[^A-Za-z0-9.-]+', '_', name)}"  # a Hydra value
                results[name].append(run_demo([*extra, *variants[name]], run_dir, env))
                r = results[name][-1]
                print(f"  {name}: {r['wall']:.1f} s, test/acc {r['acc']:.3f}", flush=True)
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    base = medians["demo"]
    there = f" | est. {reference[1]:.0f} s x row / {reference[0]}" if reference else ""
    print(f"\n| variant | Done in | x demo | test/acc | step ms | data | forward | backward | optimizer{there} |")
    print("| --- " * (9 + bool(reference)) + "|")
    for name, m in medians.items():
        estimate = f" | {reference[1] * m['wall'] / medians[reference[0]]['wall']:.0f} s" if reference else ""
        print(
            f"| {name} | {m['wall']:.1f} s | {m['wall'] / base['wall']:.2f} | {m['acc']:.3f} | {m['duration']:.0f} | "
            + " | ".join(f"{m[p]:.0f}" for p in PHASES) + f"{estimate} |"
        )  # fmt: skip


if __name__ == "__main__":
    main()
