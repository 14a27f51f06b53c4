"""Benchmark: pruned TPE vs random search without pruning, same number of trials, on the demo data.

    flock /tmp/dogbreed-bench.lock python scripts/bench_tune.py [--trials 10 --epochs 6 --seeds 0 1 2]

For each seed and arm it runs a local Optuna study (``dogbreed.tune.tune``) and records the epochs all
trials spent and the best objective (best ``val/acc`` of any trial). Goal of the issue: pruned TPE within
1 point of random's best objective with at most 1/3 of its epochs. Trials are shrunk to run on a couple of
CPU cores (whole epochs of the demo's 1,500 training images, at 32 px; early stopping off so that only
pruning saves epochs); with 300 validation images one point is 3 images, so the figures are noisy and
only comparable between arms of one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import optuna
from omegaconf import open_dict

from dogbreed import tune as tune_mod
from dogbreed.config import compose_config


def run_arm(args: argparse.Namespace, seed: int, sampler: str, pruner: str, out: Path) -> dict:
    overrides = [
        "experiment=demo",
        "logger=none",
        "callbacks.model_checkpoint.save_last=false",
        f"seed={seed}",
        f"trainer.max_epochs={args.epochs}",
        f"+trainer.limit_train_batches={args.train_batches or 1.0}",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "data.image_size=32",
        "data.resize_size=36",
        f"tune.n_trials={args.trials}",
        f"tune.sampler={sampler}",
        f"tune.pruner={pruner}",
        f"tune.n_startup_trials={args.startup}",
        f"tune.n_warmup_steps={args.warmup}",
        "tune.heartbeat_interval=null",
        f"paths.output_dir={out}",
        f"paths.cache_dir={args.out / 'cache'}",
    ]
    cfg = compose_config("tune", overrides)
    with open_dict(cfg):
        cfg.paths.model_dir = str(out / "model")
        # only pruning may end a trial early (no early stopping), and no per-trial debugger/profiler cost
        for name in [n for n in cfg.callbacks if n not in ("model_checkpoint", "log_metrics")]:
            cfg.callbacks.pop(name)
    start = time.perf_counter()
    study = tune_mod.tune(cfg)
    done = tune_mod.finished_trials(study)
    return {
        "seed": seed,
        "arm": f"{sampler}+{pruner}",
        "trials": len(done),
        "pruned": sum(t.state.name == "PRUNED" for t in done),
        "epochs": sum(t.user_attrs.get(tune_mod.EPOCHS_ATTR, 0) for t in done),
        "best": study.best_value,
        "wall_s": round(time.perf_counter() - start, 1),
        # (epochs, objective) per trial in the order they ran: for epochs-to-target
        "history": [(t.user_attrs.get(tune_mod.EPOCHS_ATTR, 0), t.value) for t in sorted(done, key=lambda t: t.number)],
    }


def epochs_to_reach(history: list[tuple[int, float | None]], target: float) -> int | None:
    """Epochs spent until a trial first reached ``target`` (None if none did)."""
    spent = 0
    for epochs, value in history:
        spent += epochs
        if value is not None and value >= target:
            return spent
    return None


def summarise(rows: list[dict]) -> str:
    lines = [
        "| arm | seeds | mean epochs | mean best val/acc | per seed (epochs, best) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        per_seed = ", ".join(f"s{r['seed']}: {r['epochs']}, {r['best']:.3f}" for r in mine)
        lines.append(
            f"| {arm} | {len(mine)} | {statistics.mean(r['epochs'] for r in mine):.1f} | "
            f"{statistics.mean(r['best'] for r in mine):.4f} | {per_seed} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument(
        "--train-batches", type=int, default=0, help="training batches per epoch (0: the whole training set)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pruners", nargs="+", default=["median", "asha"], help="pruners for the TPE arms")
    parser.add_argument("--startup", type=int, default=2, help="tune.n_startup_trials (TPE and median pruner)")
    parser.add_argument("--warmup", type=int, default=0, help="tune.n_warmup_steps (median pruner)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_tune"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    rows = []
    arms = [("random", "none"), *(("tpe", p) for p in args.pruners)]
    for seed in args.seeds:
        for sampler, pruner in arms:
            row = run_arm(args, seed, sampler, pruner, args.out / f"seed{seed}" / f"{sampler}-{pruner}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "results.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}))
    table = summarise(rows)
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    random_rows = {r["seed"]: r for r in rows if r["arm"] == "random+none"}
    for arm in dict.fromkeys(r["arm"] for r in rows if r["arm"] != "random+none"):
        mine = [r for r in rows if r["arm"] == arm]
        ratio = sum(r["epochs"] for r in mine) / sum(random_rows[r["seed"]]["epochs"] for r in mine)
        gap = statistics.mean(random_rows[r["seed"]]["best"] - r["best"] for r in mine) * 100
        print(f"{arm}: all trials: {ratio:.2f} of random's epochs, best {gap:+.2f} points below random's")
        # anytime view: epochs until within 1 point of random's best, vs all of random's epochs
        reached = [epochs_to_reach(r["history"], random_rows[r["seed"]]["best"] - 0.01) for r in mine]
        for r, spent in zip(mine, reached, strict=True):
            total = random_rows[r["seed"]]["epochs"]
            verdict = f"{spent} epochs = {spent / total:.2f} of random's {total}" if spent else "never"
            print(f"  seed {r['seed']}: reached random's best - 1 point after {verdict}")
        met = all(
            spent is not None and spent <= random_rows[r["seed"]]["epochs"] / 3
            for r, spent in zip(mine, reached, strict=True)
        )
        print(f"  goal (within 1 point with <= 1/3 of the epochs) {'met' if met else 'not met'} on every seed")


if __name__ == "__main__":
    main()
