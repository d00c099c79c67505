"""Does upcycling a dense model beat training the MoE from scratch for the same total time? (issue 18)

For each seed, through ``lightning_moe.train.run`` (configs composed as on the command line, CSV logger;
training time = time in training batches, validation left out):

1. ``scratch``: the MoE translator (``--moe`` preset, E experts) trained from scratch for ``--steps`` steps;
   its training time ``T`` and time per step are measured;
2. ``dense``: the dense twin with the experts' FFN width (``moe=dense moe.k=1``, what upcycling needs) for
   ``--dense-fraction * --steps`` steps;
3. ``upcycled``: ``init_from=<dense checkpoint> moe.upcycle=true``, trained for as many MoE steps as fit in
   what is left of ``T`` after the dense phase (at the scratch run's time per step).

Reported per arm: final validation NLL and greedy BLEU (the runs' last ``val/nll`` and ``val/bleu`` in
``metrics.csv``, validation only at the end), steps, seconds; medians over seeds. The dense arm's own score is
shown too (what the upcycled model starts from). Both MoE arms are dropless by default: the upcycled router
starts at zero (that makes step 0 exact), so every token first picks the same two experts, and a capacity
would drop most of them until the router learns. Small defaults (``tiny`` model, the embedded sample) so that
two seeds take about a quarter of an hour on 2 CPU cores.

    python benchmarks/upcycling.py --seeds 0 1 --steps 600 --out benchmarks/results/upcycling
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_moe import train as train_module  # noqa: E402
from lightning_moe.config import register_configs, to_train_config  # noqa: E402


class TrainTimer(pl.Callback):
    """Seconds spent in training batches (forward, backward, optimizer step), validation left out; the first
    batch (one-time costs: loader start, lazy initialisation) is not counted, the other batches are."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.batches = 0
        self._began = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._began = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.batches += 1
        if self.batches > 1:
            self.seconds += time.perf_counter() - self._began

    def per_step(self) -> float:
        return self.seconds / max(self.batches - 1, 1)


def train(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """One ``lightning_moe.train.run`` in ``run_dir``; its training time and last validation scores."""
    from hydra import compose, initialize_config_module

    if run_dir.exists():
        shutil.rmtree(run_dir)
    register_configs()
    with initialize_config_module(config_module="lightning_moe.conf", version_base=None):
        cfg = compose(
            config_name="config",
            overrides=[
                f"name={run_dir.name}",
                f"output_dir={run_dir}",
                "logger=csv",
                "test_after_fit=false",
                "trainer.enable_progress_bar=false",
                *overrides,
            ],
        )
    timer = TrainTimer()
    train_module.run(to_train_config(cfg), [timer])
    rows = list(csv.DictReader(open(next((run_dir / "logs").glob("version_*/metrics.csv")))))
    last = {key: float(row[key]) for row in rows for key in ("val/nll", "val/bleu") if row.get(key)}
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*.ckpt"))
    return {
        "train_seconds": timer.seconds * timer.batches / max(timer.batches - 1, 1),
        "step_seconds": timer.per_step(),
        **last,
        "checkpoint": str(checkpoints[-1]),
    }


def one_seed(args: argparse.Namespace, seed: int, out: Path) -> dict[str, Any]:
    common = [f"model={args.model}", f"data={args.data}", f"seed={seed}", "trainer.limit_val_batches=1.0"]
    moe = [f"moe={args.moe}", f"moe.num_experts={args.experts}"]

    def steps_args(steps: int) -> list[str]:
        return [
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            f"checkpoint.every_n_train_steps={steps}",
        ]

    scratch = train(out / f"seed{seed}" / "scratch", [*common, *moe, *steps_args(args.steps)])
    dense_steps = max(1, round(args.dense_fraction * args.steps))
    dense = train(out / f"seed{seed}" / "dense", [*common, "moe=dense", "moe.k=1", *steps_args(dense_steps)])
    left = scratch["train_seconds"] - dense["train_seconds"]
    upcycled_steps = max(1, round(left / scratch["step_seconds"]))
    upcycled = train(
        out / f"seed{seed}" / "upcycled",
        [*common, *moe, f"init_from={dense['checkpoint']}", "moe.upcycle=true", *steps_args(upcycled_steps)],
    )
    for run, steps in ((scratch, args.steps), (dense, dense_steps), (upcycled, upcycled_steps)):
        run["steps"] = steps
    return {
        "seed": seed,
        "scratch": scratch,
        "dense": dense,
        "upcycled": upcycled,
        "upcycled_total_train_seconds": dense["train_seconds"] + upcycled["train_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=600, help="steps of the MoE trained from scratch")
    parser.add_argument("--dense-fraction", type=float, default=0.5, help="dense steps as a fraction of --steps")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--moe", default="dropless", help="MoE preset of both MoE arms")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--data", default="sample")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "upcycling")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lightning_moe_upcycling"), help="run folders")
    args = parser.parse_args()
    seeds = [one_seed(args, seed, args.work) for seed in args.seeds]

    summary: dict[str, Any] = {}
    print(f"{'arm':<10} {'val NLL':>8} {'val BLEU':>9} {'steps':>6} {'train s':>8}   (median over seeds {args.seeds})")
    for arm in ("scratch", "dense", "upcycled"):
        runs = [s[arm] for s in seeds]
        row = {
            key: statistics.median(r[key] for r in runs) for key in ("val/nll", "val/bleu", "steps", "train_seconds")
        }
        row["per_seed"] = [{k: r[k] for k in ("val/nll", "val/bleu", "steps", "train_seconds")} for r in runs]
        summary[arm] = row
        print(
            f"{arm:<10} {row['val/nll']:>8.3f} {row['val/bleu']:>9.2f} {row['steps']:>6.0f} {row['train_seconds']:>8.1f}"
        )
    total = statistics.median(s["upcycled_total_train_seconds"] for s in seeds)
    print(f"dense + upcycled training time: {total:.1f} s (scratch: {summary['scratch']['train_seconds']:.1f} s)")
    wins = sum(s["upcycled"]["val/nll"] < s["scratch"]["val/nll"] for s in seeds)
    print(f"upcycled has the lower validation NLL in {wins} of {len(seeds)} seeds")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "seeds": seeds,
        "summary": summary,
        "upcycled_wins_nll": wins,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (args.out / "results.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
