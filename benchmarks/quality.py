"""Does the MoE pay off? The MoE translator against its dense twin on Multi30k, on CPU.

Trains, one after another in this process and from the same seed on the same batches, the dense twin
(``moe.num_experts=0`` with the same ``moe.k``: the FFNs at MoE positions are k times wider, so a token
sees as many parameters) and top-k MoE models with 8 and 16 experts, on the multitask mixture of every
translation direction among en/de/fr plus denoising of each language (``conf/tasks/all_directions.yaml``).
Every run goes through ``lightning_moe.train.run`` (configs composed with Hydra's compose API, CSV logger,
``checkpoint.resume=never``, its own ``name`` / ``output_dir``), with one extra callback (:class:`TrainClock`)
that times the training steps.

Measured:

* validation NLL every ``--val-every`` steps (``val/nll``, on ``--val-sentences`` sentences per direction; checked
  against the run's ``metrics.csv``) -> ``val_curves.png``;
* BLEU and chrF per direction on test_2016_flickr and test_2017_flickr (``lightning_moe.evaluate``, greedy,
  at most ``--max-test-sentences`` per direction) of each model at ``--steps`` steps;
* training throughput: non-padding source + target tokens of the training batches divided by the training
  wall time without validation (and without this script's snapshot saves), as a ratio to the dense twin;
  and, because a shared machine is noisy, an interleaved measurement: in one process, the trained models
  take turns of ``--interleave-steps`` training steps on the same batches for ``--interleave-rounds``
  rounds (order reversed every other round); the ratio is the median over rounds;
* equal wall-clock: the MoE runs go first; the dense run then trains past ``--steps`` if needed (the
  inverse-sqrt schedule does not depend on the run length, so its first ``--steps`` are unchanged) until its
  training time reaches that of the reference MoE run (MoE-8), keeps a weights-only checkpoint at the step
  nearest that time and scores it on en->de (and de->en);
* the expert-load heatmap of the MoE-8 model at its last validation (``ExpertLoadMonitor``).

Outputs in ``--out``: ``results.json``, ``val_curves.png``, ``expert_load_moe8.png``, ``report.md``
(drawn by ``benchmarks/quality_report.py``, which re-renders them from ``results.json`` too).

Run from the repository root (nothing is downloaded; the data comes from ``--data-root``)::

    python benchmarks/quality.py                        # the full report: about one hour on 2 CPU cores
    python benchmarks/quality.py --smoke --out /tmp/q   # a tiny version on the embedded sample (~half a minute)

Default run length: ``--steps 1200`` trains each model for about a quarter of an hour on 2 CPU cores with one
torch thread (one thread: on a 2-core machine shared with other jobs, 2 threads made small matrix products 4-5x
slower in a measurement here); how it was estimated is in :data:`TIMING_NOTE` and in report.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

import lightning_moe.train as train_module  # noqa: E402
from lightning_moe.config import TrainConfig, register_configs, to_train_config  # noqa: E402
from lightning_moe.data.corpus import available_languages, available_splits  # noqa: E402
from lightning_moe.data.download import SAMPLE_DIR  # noqa: E402
from lightning_moe.models import count_parameters  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_report  # noqa: E402

TEST_SPLITS = ("test_2016_flickr", "test_2017_flickr")
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data" / "multi30k"
TIMING_NOTE = (
    "the default --steps 1200 comes from short timing runs of this script with the default settings (40 and 60 steps "
    "per model, model=tiny, 1 thread, 2 CPU cores shared with other jobs at load 1-3.7, 2026-11-27): 0.65-0.8 s per "
    "training step for each of the three models, 6.5 s per validation (400 sentences x 6 directions), 5 ms (dense) to "
    "10 ms (MoE) per greedy test sentence for barely trained models (long outputs: an upper bound), 1.4 min for the "
    "interleaved measurement; so 13-16 min of training + 1.3 min of validation per run, about 5 min to decode the "
    "12 x 1000 test sentences of each model: 50-60 min in all (more when the dense run has to train past --steps to "
    "reach the MoE-8 training time)"
)
"""Put into report.md: how the default run length was chosen (the measured total is reported beside it)."""


# ----------------------------------------------------------------------------------------- arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; ``--smoke`` replaces the defaults by a tiny configuration."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data-root",
        default=None,
        help=f"Multi30k folder (default {DEFAULT_DATA_ROOT} if it exists; --smoke: the embedded sample)",
    )
    p.add_argument("--steps", type=int, default=None, help="training steps of every model (default 1200; --smoke 8)")
    p.add_argument("--val-every", type=int, default=None, help="validation period in steps (default steps/12)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality"), help="output folder")
    p.add_argument("--model", default="tiny", help="model preset (lightning_moe.models.PRESETS: tiny, small, base)")
    p.add_argument(
        "--experts", type=int, nargs="+", default=[0, 8, 16], help="expert counts; 0 = the dense twin (required)"
    )
    p.add_argument("--k", type=int, default=2, help="experts per token (also the dense twin's FFN width factor)")
    p.add_argument("--reference-experts", type=int, default=8, help="the MoE run the equal wall-clock comparison uses")
    p.add_argument("--vocab-size", type=int, default=None, help="shared subword vocabulary (default 8000; --smoke 300)")
    p.add_argument("--max-len", type=int, default=None, help="data.max_len (default 64: Multi30k lines are short)")
    p.add_argument("--max-tokens", type=int, default=None, help="data.max_tokens per training batch (default 2048)")
    p.add_argument("--lr", type=float, default=None, help="optim.lr (default: the config's)")
    p.add_argument(
        "--warmup-steps", type=int, default=None, help="optim.warmup_steps (default: steps/8, at most the config's 200)"
    )
    p.add_argument("--seed", type=int, default=1234, help="seed of every run")
    p.add_argument(
        "--max-test-sentences",
        type=int,
        default=None,
        help="test sentences per direction and split (default 0 = all 1000; --smoke 8)",
    )
    p.add_argument(
        "--val-sentences",
        type=int,
        default=None,
        help="validation sentences per direction (data.max_eval_sentences; default 400; --smoke 24)",
    )
    p.add_argument(
        "--equal-time-clock",
        choices=("wall", "cpu"),
        default="wall",
        help="clock of the equal wall-clock match (cpu: process CPU time, steadier on a loaded machine)",
    )
    p.add_argument(
        "--max-dense-factor", type=float, default=4.0, help="the dense run stops at most at this many times --steps"
    )
    p.add_argument(
        "--interleave-steps", type=int, default=None, help="training steps per model and turn (default 5; --smoke 1)"
    )
    p.add_argument("--interleave-rounds", type=int, default=None, help="rounds of turns (default 7; --smoke 2)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default 1: steadier than 2 on a shared 2-core machine)",
    )
    p.add_argument("--cache-dir", default=None, help="data.cache_dir for the tokenizer (default: the project's cache)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for every run (repeatable)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps and sentences, embedded sample data")
    args = p.parse_args(argv)
    _fill_defaults(args)
    _check_args(p, args)
    return args


def _fill_defaults(args: argparse.Namespace) -> None:
    """Defaults that depend on ``--smoke``."""
    smoke = args.smoke
    defaults = {
        "steps": 8 if smoke else 1200,
        "vocab_size": 300 if smoke else 8000,
        "max_len": 64,
        "max_tokens": 512 if smoke else 2048,
        "max_test_sentences": 8 if smoke else 0,
        "val_sentences": 24 if smoke else 400,
        "interleave_steps": 1 if smoke else 5,
        "interleave_rounds": 2 if smoke else 7,
        "threads": 1,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.val_every is None:
        args.val_every = 4 if smoke else max(1, args.steps // 12)  # 12 points on the curves
    if args.warmup_steps is None:
        args.warmup_steps = 2 if smoke else min(200, max(1, args.steps // 8))
    if args.data_root is None:
        if smoke:
            args.data_root = str(SAMPLE_DIR)
        elif DEFAULT_DATA_ROOT.is_dir():
            args.data_root = str(DEFAULT_DATA_ROOT)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if 0 not in args.experts:
        parser.error("--experts must include 0 (the dense twin every ratio refers to)")
    if len(set(args.experts)) != len(args.experts):
        parser.error(f"--experts {args.experts} repeats a count")
    if any(e != 0 and e < args.k for e in args.experts):
        parser.error(f"every expert count must be 0 or >= --k={args.k}")
    if args.steps < 1 or args.val_every < 1 or args.interleave_steps < 1 or args.interleave_rounds < 1:
        parser.error("--steps, --val-every, --interleave-steps and --interleave-rounds must be >= 1")
    if args.max_dense_factor < 1:
        parser.error("--max-dense-factor must be >= 1")
    if args.data_root is None:
        parser.error(f"no --data-root given and {DEFAULT_DATA_ROOT} does not exist (this benchmark downloads nothing)")


# ------------------------------------------------------------------------------------------ configs


def label_of(experts: int) -> str:
    """Run label: ``dense`` or ``moe<E>``."""
    return "dense" if experts == 0 else f"moe{experts}"


def present_test_splits(root: str) -> list[str]:
    """The test splits of :data:`TEST_SPLITS` present under ``root``."""
    present = set(available_splits(root))
    return [s for s in TEST_SPLITS if s in present]


def run_overrides(args: argparse.Namespace, experts: int, run_dir: Path, max_steps: int) -> list[str]:
    """Hydra overrides of one run (the same for every model but the expert count and the length)."""
    overrides = [
        f"model={args.model}",
        "moe=top2",
        f"moe.num_experts={experts}",
        f"moe.k={args.k}",
        "moe.eval_capacity_factor=2.0",
        "data=multi30k",
        f"data.root={_quoted(args.data_root)}",
        "data.download=false",
        f"data.vocab_size={args.vocab_size}",
        f"data.max_len={args.max_len}",
        f"data.max_tokens={args.max_tokens}",
        f"data.max_eval_sentences={args.val_sentences}",
        f"data.test_splits=[{','.join(present_test_splits(args.data_root))}]",
        "tasks=all_directions",
        "strategy=single",
        "trainer=cpu",
        f"trainer.max_steps={max_steps}",
        f"trainer.val_check_interval={args.val_every}",
        "trainer.limit_val_batches=1.0",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"trainer.log_every_n_steps={max(1, min(50, args.val_every))}",
        f"optim.warmup_steps={args.warmup_steps}",
        "optim.schedule=inverse_sqrt",  # independent of max_steps: the dense run may train past --steps
        "generation.val_max_sentences=0",  # validation = loss only; BLEU comes from the test sets afterwards
        f"checkpoint.every_n_train_steps={max_steps}",
        "checkpoint.keep_last=1",
        "checkpoint.resume=never",
        f"name=quality_{label_of(experts)}",
        f"output_dir={_quoted(str(run_dir))}",
        f"seed={args.seed}",
        "test_after_fit=false",
    ]
    if args.lr is not None:
        overrides.append(f"optim.lr={args.lr}")
    if args.cache_dir is not None:
        overrides.append(f"data.cache_dir={_quoted(args.cache_dir)}")
    if args.smoke:
        overrides += [
            "model.d_model=32",
            "model.num_heads=2",
            "model.ffn_hidden_size=32",
            "data.max_train_sentences=300",
        ]
    return overrides + list(args.override)


def _quoted(value: str) -> str:
    """``value`` as a quoted Hydra override value (paths may hold characters the override grammar reserves)."""
    return "'" + value.replace("'", "\\'") + "'"


def compose_config(overrides: list[str]) -> TrainConfig:
    """A validated :class:`TrainConfig` composed from ``lightning_moe.conf`` with ``overrides``."""
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module(config_module="lightning_moe.conf", version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    return to_train_config(cfg)


# ------------------------------------------------------------------------------------ timing callback


def count_tokens(batch: dict[str, Any]) -> int:
    """Non-padding source + target tokens of a batch."""
    return int((~batch["src_padding_mask"]).sum()) + int((~batch["tgt_padding_mask"]).sum())


class ClockPoint(NamedTuple):
    """The clock after one training step."""

    step: int
    seconds: float
    """Training wall seconds so far."""
    cpu_seconds: float
    """Process CPU seconds so far (steadier than wall time on a loaded machine)."""
    tokens: int
    """Non-padding source + target tokens trained on so far."""


class Stopwatch:
    """Wall and process-CPU seconds since :meth:`start`, without the spans between :meth:`pause` and :meth:`resume`."""

    def __init__(self) -> None:
        self.start()
        self._paused_at: tuple[float, float] | None = None

    def start(self) -> None:
        """Zero the stopwatch."""
        self._origin = (time.perf_counter(), time.process_time())
        self._left_out = [0.0, 0.0]

    def read(self) -> tuple[float, float]:
        """``(wall, cpu)`` seconds counted so far."""
        return (
            time.perf_counter() - self._origin[0] - self._left_out[0],
            time.process_time() - self._origin[1] - self._left_out[1],
        )

    def pause(self) -> None:
        """Stop counting (until :meth:`resume`)."""
        self._paused_at = (time.perf_counter(), time.process_time())

    def resume(self) -> float:
        """Count again; returns the wall seconds left out by this pause (0 when not paused)."""
        if self._paused_at is None:
            return 0.0
        wall = time.perf_counter() - self._paused_at[0]
        self._left_out[0] += wall
        self._left_out[1] += time.process_time() - self._paused_at[1]
        self._paused_at = None
        return wall


class TrainClock(pl.Callback):
    """Training time without validation, tokens processed, the validation curve, and weights-only snapshots.

    The clock starts when the first training step ends (that step carries one-time costs: the loader's first
    iterator, lazy initialisation, allocator warm-up; it counts for neither time nor tokens); validation loops
    and the snapshots' own saving time are left out. After every training batch it records a
    :class:`ClockPoint`, and after every validation ``(step, val/nll)`` (the value the CSV logger writes to
    ``metrics.csv``, where Lightning files it under ``step - 1``). Snapshots (``trainer.save_checkpoint(...,
    weights_only=True)``): ``equal_steps`` at step ``equal_steps``, and ``equal_time`` at the step whose
    training time (wall, or CPU with ``cpu_clock``) is nearest ``target_seconds``; with ``stop_when_done``
    training stops once both are taken.

    Arguments:
        snapshot_dir: folder of the snapshots.
        equal_steps: step of the ``equal_steps`` snapshot (None = none).
        target_seconds: training time of the ``equal_time`` snapshot (None = none).
        stop_when_done: stop training when the snapshots asked for are taken.
        cpu_clock: match ``target_seconds`` against CPU seconds instead of wall seconds.
    """

    def __init__(
        self,
        snapshot_dir: Path,
        equal_steps: int | None = None,
        target_seconds: float | None = None,
        stop_when_done: bool = False,
        cpu_clock: bool = False,
    ) -> None:
        self.snapshot_dir = snapshot_dir
        self.equal_steps = equal_steps
        self.target_seconds = target_seconds
        self.stop_when_done = stop_when_done
        self.cpu_clock = cpu_clock
        self.points: list[ClockPoint] = []
        self.validations: list[tuple[int, float]] = []
        self.validation_seconds = 0.0
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.log_dir: Path | None = None
        self.parameters: tuple[int, int] = (0, 0)
        self._watch = Stopwatch()
        self._tokens = 0

    def elapsed(self, point: ClockPoint) -> float:
        """The seconds of ``point`` that the equal-time comparison uses (wall or CPU)."""
        return point.cpu_seconds if self.cpu_clock else point.seconds

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = trainer.logger
        self.log_dir = Path(logger.log_dir) if logger is not None and getattr(logger, "log_dir", None) else None
        self.parameters = count_parameters(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._watch.pause()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get("val/nll")
        if value is not None and not trainer.sanity_checking:
            self.validations.append((trainer.global_step, float(value)))
        self.validation_seconds += self._watch.resume()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.points:  # the end of the first step starts the clock
            self._watch.start()
        elif not batch.get("is_repeat", False):
            self._tokens += count_tokens(batch)
        point = ClockPoint(trainer.global_step, *self._watch.read(), self._tokens)
        last_step = self.elapsed(point) - (self.elapsed(self.points[-1]) if self.points else 0.0)
        self.points.append(point)
        if self.equal_steps is not None and point.step == self.equal_steps:
            self._snapshot("equal_steps", trainer)
        # the nearest step: this one, unless the next one (about one step later) lands closer to the target
        if self.target_seconds is not None and "equal_time" not in self.snapshots:
            if self.elapsed(point) >= self.target_seconds - last_step / 2:
                self._snapshot("equal_time", trainer)
        if self.stop_when_done and self._done(point.step):
            trainer.should_stop = True

    def _done(self, step: int) -> bool:
        steps_done = self.equal_steps is None or step >= self.equal_steps
        time_done = self.target_seconds is None or "equal_time" in self.snapshots
        return steps_done and time_done

    def _snapshot(self, kind: str, trainer: pl.Trainer) -> None:
        self._watch.pause()
        point = self.points[-1]
        path = self.snapshot_dir / f"{kind}-step{point.step:06d}.ckpt"
        trainer.save_checkpoint(path, weights_only=True)
        self.snapshots[kind] = {**point._asdict(), "path": str(path)}
        self._watch.resume()

    def at_step(self, step: int) -> ClockPoint:
        """The clock after training step ``step``."""
        for point in self.points:
            if point.step == step:
                return point
        raise KeyError(f"step {step} was not trained (last: {self.points[-1].step if self.points else None})")


@contextmanager
def extra_callbacks(callbacks: list[pl.Callback]) -> Iterator[None]:
    """Make ``lightning_moe.train.run`` build its Trainer with ``callbacks`` added (``run`` has no such argument)."""
    original = train_module.build_trainer

    def build_trainer(cfg: TrainConfig, extra: list | None = None, **kwargs: Any) -> pl.Trainer:
        return original(cfg, [*(extra or []), *callbacks], **kwargs)

    train_module.build_trainer = build_trainer
    try:
        yield
    finally:
        train_module.build_trainer = original


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    """What one training run measured."""

    label: str
    experts: int
    run_dir: Path
    cfg: TrainConfig
    clock: TrainClock
    wall_seconds: float
    final_checkpoint: Path
    val_curve: list[tuple[int, float]] = field(default_factory=list)


def train_one(args: argparse.Namespace, experts: int, out: Path, target_seconds: float | None = None) -> RunResult:
    """Train one model with ``lightning_moe.train.run``; the dense run may go on to ``target_seconds``."""
    label = label_of(experts)
    run_dir = out / "runs" / label
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run: no stale checkpoints or logger versions
    continue_past = experts == 0 and target_seconds is not None
    max_steps = int(args.steps * args.max_dense_factor) if continue_past else args.steps
    cfg = compose_config(run_overrides(args, experts, run_dir, max_steps))
    clock = TrainClock(
        run_dir / "snapshots",
        equal_steps=args.steps if experts == 0 else None,
        target_seconds=target_seconds if continue_past else None,
        stop_when_done=continue_past,
        cpu_clock=args.equal_time_clock == "cpu",
    )
    print(f"[quality] training {label}: up to {max_steps} steps in {run_dir}", flush=True)
    began = time.perf_counter()
    with extra_callbacks([clock]):
        train_module.run(cfg)
    wall = time.perf_counter() - began
    last = clock.points[-1]
    final = run_dir / "checkpoints" / f"step-{last.step:06d}.ckpt"
    result = RunResult(label, experts, run_dir, cfg, clock, wall, final, list(clock.validations))
    check_metrics_csv(clock)
    print(f"[quality] {label}: {last.step} steps, {last.seconds:.0f} s training, {wall:.0f} s wall", flush=True)
    return result


def read_val_curve(log_dir: Path) -> list[tuple[int, float]]:
    """``(step, val/nll)`` rows of the CSV logger's ``metrics.csv`` under ``log_dir`` (Lightning's step column:
    the optimizer steps taken *before* the one that triggered the validation)."""
    import csv

    files = sorted(log_dir.rglob("metrics.csv")) if log_dir.is_dir() else []
    if not files:
        return []
    curve = []
    with open(files[-1], newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("val/nll"):
                curve.append((int(row["step"]), float(row["val/nll"])))
    return curve


def check_metrics_csv(clock: TrainClock) -> None:
    """Warn when the curve in ``metrics.csv`` is not the one the clock recorded (one step earlier, same values)."""
    logged = read_val_curve(clock.log_dir) if clock.log_dir else []
    expected = [(step - 1, value) for step, value in clock.validations]
    same = len(logged) == len(expected) and all(
        a == c and abs(b - d) <= 1e-5 * max(1.0, abs(d)) for (a, b), (c, d) in zip(logged, expected)
    )
    if not same:
        print(f"[quality] warning: metrics.csv holds {logged[:3]}... where {expected[:3]}... was expected", flush=True)


def equal_steps_checkpoint(run: RunResult) -> Path:
    """The checkpoint of ``run`` after ``--steps`` steps (the dense run may have gone on)."""
    snapshot = run.clock.snapshots.get("equal_steps")
    return Path(snapshot["path"]) if snapshot else run.final_checkpoint


# ---------------------------------------------------------------------------------------- evaluation


def evaluate_checkpoint(
    args: argparse.Namespace, checkpoint: Path, directions: list[str] | None = None
) -> list[dict[str, Any]]:
    """BLEU/chrF rows (``lightning_moe.evaluate``) of ``checkpoint``, greedy, capped per direction."""
    from lightning_moe.evaluate import EvaluateConfig, EvaluateDataConfig, evaluate

    rows = evaluate(
        EvaluateConfig(
            checkpoint=str(checkpoint),
            data=EvaluateDataConfig(root=args.data_root),
            splits=present_test_splits(args.data_root),
            directions=list(directions or []),
            beam_size=1,
            batch_size=64,
            max_sentences=args.max_test_sentences or None,
            device="cpu",
        )
    )
    return [{k: r[k] for k in ("split", "direction", "sentences", "bleu", "chrf")} for r in rows]


def equal_time_directions(root: str) -> list[str]:
    """The directions scored at equal wall-clock: en->de (the goal's) and de->en, where the data has them."""
    langs = set(available_languages(root, "train"))
    return [d for d in ("en-de", "de-en") if set(d.split("-")) <= langs]


# ---------------------------------------------------------------------------------------- throughput


def interleaved_throughput(args: argparse.Namespace, runs: list[RunResult]) -> dict[str, Any]:
    """Median over rounds of each model's tokens/s relative to the dense twin, models taking turns on the same batches."""
    from lightning_moe.data.datamodule import MultitaskDataModule
    from lightning_moe.inference import load_model_weights

    dense = next(r for r in runs if r.experts == 0)
    datamodule = MultitaskDataModule(dense.cfg.data, dense.cfg.tasks)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batches = list(islice(iter(datamodule.train_dataloader()), args.interleave_steps))
    tokens = sum(count_tokens(b) for b in batches)
    models = {}
    for run in runs:
        module = train_module.build_module(run.cfg, datamodule)
        load_model_weights(module, equal_steps_checkpoint(run))
        module.train()
        optimizer = module.configure_optimizers()["optimizer"]
        models[run.label] = (module, optimizer)
        _train_steps(module, optimizer, batches[:1])  # warm-up: allocator, AdamW state
    seconds: dict[str, list[float]] = {label: [] for label in models}
    labels = list(models)
    for round_index in range(args.interleave_rounds):
        for label in labels if round_index % 2 == 0 else labels[::-1]:
            began = time.perf_counter()
            _train_steps(*models[label], batches)
            seconds[label].append(time.perf_counter() - began)
    ratios = {label: [d / s for d, s in zip(seconds["dense"], seconds[label])] for label in labels}
    return {
        "steps_per_turn": args.interleave_steps,
        "rounds": args.interleave_rounds,
        "tokens_per_turn": tokens,
        "seconds": seconds,
        "tokens_per_s": {label: tokens / statistics.median(seconds[label]) for label in labels},
        "ratio_per_round": ratios,
        "ratio_median": {label: statistics.median(ratios[label]) for label in labels},
    }


def _train_steps(module: pl.LightningModule, optimizer: torch.optim.Optimizer, batches: list[dict[str, Any]]) -> None:
    """The module's own ``training_step`` + backward + clipping (as the runs: norm 1.0) + AdamW, per batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() without a Trainer warns and does nothing
        for index, batch in enumerate(batches):
            loss = module.training_step(batch, index)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


# -------------------------------------------------------------------------------------------- results


def run_record(run: RunResult, steps: int, dense: ClockPoint) -> dict[str, Any]:
    """The JSON record of one run: sizes, times, tokens/s (at ``steps``) and its validation curve."""
    point = run.clock.at_step(steps)
    total, active = run.clock.parameters
    curve = [(s, v) for s, v in run.val_curve]
    return {
        "label": run.label,
        "experts": run.experts,
        "params_total": total,
        "params_active": active,
        "steps": steps,
        "steps_trained": run.clock.points[-1].step,
        "train_seconds": round(point.seconds, 2),
        "train_cpu_seconds": round(point.cpu_seconds, 2),
        "wall_seconds": round(run.wall_seconds, 2),
        "validation_seconds": round(run.clock.validation_seconds, 2),
        "validations": len(run.clock.validations),
        "tokens": point.tokens,
        "tokens_per_s": round(point.tokens / point.seconds, 1),
        "throughput_ratio": round((point.tokens / point.seconds) / (dense.tokens / dense.seconds), 4),
        "throughput_ratio_cpu": round((point.tokens / point.cpu_seconds) / (dense.tokens / dense.cpu_seconds), 4),
        "val_curve": curve,
        "val_nll_at_steps": next((v for s, v in curve if s == steps), None),
        "checkpoint": str(equal_steps_checkpoint(run)),
        "log_dir": str(run.clock.log_dir) if run.clock.log_dir else None,
    }


def machine_facts() -> dict[str, Any]:
    """Versions, threads and load of this machine."""
    import lightning

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def copy_heatmap(run: RunResult, target: Path) -> str | None:
    """Copy the last ``expert_load_step<N>.png`` of ``run`` to ``target``; the source path, or None."""
    folder = run.clock.log_dir or run.run_dir
    maps = sorted(folder.rglob("expert_load_step*.png"), key=lambda p: int(p.stem.removeprefix("expert_load_step")))
    if not maps:
        return None
    shutil.copyfile(maps[-1], target)
    return str(maps[-1])


def regenerate_heatmap(run: RunResult, target: Path) -> str:
    """Draw the expert load of ``run``'s final model on validation batches (when no heatmap was logged)."""
    from lightning_moe.callbacks import expert_load_heatmap, find_moe_layers
    from lightning_moe.data.datamodule import MultitaskDataModule
    from lightning_moe.inference import load_translator

    module = load_translator(equal_steps_checkpoint(run))
    datamodule = MultitaskDataModule(run.cfg.data, run.cfg.tasks)
    datamodule.setup("validate")
    layers = find_moe_layers(module)
    load = torch.zeros(len(layers), max(layer.num_experts for _, layer in layers), dtype=torch.float64)
    with torch.no_grad():
        for loader in datamodule.val_dataloader():
            for batch in islice(loader, 2):
                module(batch)
                for row, (_, layer) in enumerate(layers):
                    counts = layer.last_stats.tokens_per_expert.double()
                    load[row, : counts.numel()] += counts
    fractions = load / load.sum(dim=1, keepdim=True).clamp_min(1.0)
    expert_load_heatmap(fractions.float(), [name for name, _ in layers], target)
    return "regenerated from the final checkpoint on validation batches"


def goals(record: dict[str, Any]) -> dict[str, Any]:
    """The issue's three goals, each ``met`` true/false (None: not measurable) with the numbers behind it."""
    runs = {r["label"]: r for r in record["runs"]}
    moe = [r for r in record["runs"] if r["experts"] > 0]
    return {
        "moe_below_dense_val_loss": _loss_goal(runs["dense"], moe, record["settings"]["steps"]),
        "bleu_gain_en_de_2016": _bleu_goal(runs, record["settings"]["reference"], record.get("equal_wall_clock")),
        "throughput": _throughput_goal(moe, (record.get("interleaved") or {}).get("ratio_median", {})),
    }


def _loss_goal(dense: dict[str, Any], moe: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Every MoE run's validation NLL at ``steps`` below the dense twin's (and at how many validations it is)."""
    dense_curve, dense_nll = dict(dense["val_curve"]), dense["val_nll_at_steps"]
    runs = {}
    for r in moe:
        curve = dict(r["val_curve"])
        common = [s for s in curve if s in dense_curve and s <= steps]
        wins = [s for s in common if curve[s] < dense_curve[s]]
        runs[r["label"]] = {
            "val_nll": r["val_nll_at_steps"],
            "dense_val_nll": dense_nll,
            "validations_below_dense": f"{len(wins)}/{len(common)}",
        }
    measurable = bool(moe) and dense_nll is not None and all(r["val_nll_at_steps"] is not None for r in moe)
    return {
        "met": all(r["val_nll_at_steps"] < dense_nll for r in moe) if measurable else None,
        "criterion": "val NLL at --steps below the dense twin's, every MoE run",
        "runs": runs,
    }


def _bleu_goal(runs: dict[str, dict[str, Any]], reference: str, equal: dict[str, Any] | None) -> dict[str, Any]:
    """The reference MoE's BLEU gain over dense on en-de test_2016_flickr, at equal wall-clock (the goal) and equal steps."""

    def gain(moe_rows: list[dict[str, Any]], dense_rows: list[dict[str, Any]]) -> float | None:
        a, b = _bleu(moe_rows, "test_2016_flickr", "en-de"), _bleu(dense_rows, "test_2016_flickr", "en-de")
        return None if a is None or b is None else round(a - b, 2)

    has_reference = reference != "dense" and reference in runs
    at_time = gain(runs[reference]["tests"], equal["rows"]) if has_reference and equal else None
    at_steps = gain(runs[reference]["tests"], runs["dense"]["tests"]) if has_reference else None
    return {
        "met": None if at_time is None else at_time >= 1.0,
        "criterion": f"{reference} BLEU - dense BLEU >= +1 on en-de test_2016_flickr at equal training wall-clock",
        "gain_equal_wall_clock": at_time,
        "gain_equal_steps": at_steps,
    }


def _throughput_goal(moe: list[dict[str, Any]], interleaved: dict[str, float]) -> dict[str, Any]:
    """Every MoE run's training tokens/s at least 0.8x the dense twin's (interleaved median decides)."""
    return {
        "met": all(interleaved.get(r["label"], 0.0) >= 0.8 for r in moe) if moe and interleaved else None,
        "criterion": "MoE training tokens/s >= 0.8x dense (interleaved median; the in-run ratio is listed beside it)",
        "interleaved": {r["label"]: interleaved.get(r["label"]) for r in moe},
        "in_run": {r["label"]: r["throughput_ratio"] for r in moe},
    }


def _bleu(rows: list[dict[str, Any]], split: str, direction: str) -> float | None:
    return next((r["bleu"] for r in rows if r["split"] == split and r["direction"] == direction), None)


# ----------------------------------------------------------------------------------------------- main


def train_all(args: argparse.Namespace, out: Path) -> tuple[dict[int, RunResult], int]:
    """Every run, MoE first (the dense run needs the reference's training time); returns them and the reference."""
    ordered = sorted(e for e in args.experts if e > 0) + [0]
    moe = ordered[:-1]
    reference = args.reference_experts if args.reference_experts in moe else (moe[0] if moe else 0)
    runs: dict[int, RunResult] = {}
    for experts in ordered:
        target = (
            runs[reference].clock.elapsed(runs[reference].clock.at_step(args.steps))
            if experts == 0 and reference in runs
            else None
        )
        runs[experts] = train_one(args, experts, out, target_seconds=target)
    return runs, reference


def equal_wall_clock_record(
    args: argparse.Namespace, runs: dict[int, RunResult], reference: int
) -> dict[str, Any] | None:
    """The dense checkpoint nearest the reference run's training time, scored (None when there is none)."""
    snapshot = runs[0].clock.snapshots.get("equal_time")
    if snapshot is None:
        if reference:
            print(
                "[quality] the dense run never reached the reference's training time (raise --max-dense-factor)",
                flush=True,
            )
        return None
    print("[quality] evaluating the dense model at the reference's wall-clock", flush=True)
    return {
        "reference": label_of(reference),
        "clock": "cpu" if args.equal_time_clock == "cpu" else "wall",
        "reference_train_seconds": round(runs[reference].clock.at_step(args.steps).seconds, 2),
        "reference_train_cpu_seconds": round(runs[reference].clock.at_step(args.steps).cpu_seconds, 2),
        "dense_step": snapshot["step"],
        "dense_train_seconds": round(snapshot["seconds"], 2),
        "dense_train_cpu_seconds": round(snapshot["cpu_seconds"], 2),
        "capped": snapshot["step"] >= int(args.steps * args.max_dense_factor),
        "checkpoint": snapshot["path"],
        "rows": evaluate_checkpoint(args, Path(snapshot["path"]), equal_time_directions(args.data_root)),
    }


def evaluate_all(
    args: argparse.Namespace, runs: dict[int, RunResult], reference: int
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The run records (dense first) with their test scores, and the equal wall-clock record."""
    display = [runs[e] for e in sorted(runs)]
    dense_at_steps = runs[0].clock.at_step(args.steps)
    records = [run_record(r, args.steps, dense_at_steps) for r in display]
    for record, run in zip(records, display):
        print(f"[quality] evaluating {run.label}", flush=True)
        began = time.perf_counter()
        record["tests"] = evaluate_checkpoint(args, equal_steps_checkpoint(run))
        record["test_seconds"] = round(time.perf_counter() - began, 1)
    return records, equal_wall_clock_record(args, runs, reference)


def heatmap_of(run: RunResult, out: Path) -> str:
    """``expert_load_<label>.png`` in ``out``: the run's last logged heatmap, else one drawn anew."""
    target = out / f"expert_load_{run.label}.png"
    return copy_heatmap(run, target) or regenerate_heatmap(run, target)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, evaluate and measure every model, then write results.json, the plots and report.md."""
    began = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/quality.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    machine = machine_facts()
    phases: dict[str, float] = {}

    runs, reference = train_all(args, out)
    phases["training"] = time.perf_counter() - began
    records, equal_wall_clock = evaluate_all(args, runs, reference)
    phases["evaluation"] = time.perf_counter() - began - phases["training"]
    print("[quality] interleaved throughput", flush=True)
    interleaved = interleaved_throughput(args, [runs[e] for e in sorted(runs)])
    phases["interleaved"] = time.perf_counter() - began - phases["training"] - phases["evaluation"]
    heatmap = heatmap_of(runs[reference], out) if reference else None

    settings = dict(vars(args), reference=label_of(reference), test_splits=present_test_splits(args.data_root))
    result: dict[str, Any] = {
        "command": command,
        "machine": machine,
        "settings": settings,
        "timing_note": TIMING_NOTE,
        "runs": records,
        "equal_wall_clock": equal_wall_clock,
        "interleaved": interleaved,
        "heatmap_source": heatmap,
        "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
    }
    result["goals"] = goals(result)
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["total_wall_seconds"] = round(time.perf_counter() - began, 1)
    files = quality_report.write_outputs(result, out)
    print(f"[quality] wrote {', '.join(str(f) for f in files)} in {result['total_wall_seconds']:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
