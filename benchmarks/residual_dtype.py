"""The translator's residual stream in bf16 against fp32 under bf16-mixed: training steps both ways, alternating.

Two copies of the model (the same preset, initial weights and batches) train side by side in one process under
bf16 autocast, one with the residual stream in bf16 (``TransformerConfig.residual_in_compute_dtype``, the default)
and one with it in fp32 (``--fp32-residual`` of ``train_throughput.py``). After ``--warmup`` steps each, every
round times ``--steps`` steps of each model right after one untimed step of its own, the order alternating from
round to round, so that noise and the other model's cache traffic fall on both alike. Printed: median and best
step time of each, and the median of the per-round ratios fp32 stream / bf16 stream (above 1: the bf16 stream is
faster). fp32 training (``32-true``) has no autocast and is the same either way.

    python benchmarks/residual_dtype.py --preset small --threads 2 --batch-size 64 --rounds 12
    python benchmarks/residual_dtype.py --preset small --threads 2 --batch-size 64 --rounds 12 --experts 0  # dense twin
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import (  # noqa: E402  (beside this file)
    Trainer,
    add_model_arguments,
    record_header,
    step_summary,
    write_record,
)

STREAMS = {"bf16 stream": False, "fp32 stream": True}
"""The two variants: name -> ``--fp32-residual``."""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--warmup", type=int, default=25, help="untimed steps of each model first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of each model per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the result record to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    trainers = {}
    for name, fp32_residual in STREAMS.items():
        settings = {"fp32_residual": fp32_residual, "precision": "bf16-mixed", "compile": False, "num_batches": 4}
        variant = argparse.Namespace(**{**vars(args), **settings, "lr": 1e-4})
        trainers[name] = Trainer(variant, device)
        trainers[name].time_steps(args.warmup)
    step_s: dict[str, list[float]] = {name: [] for name in trainers}
    for round_index in range(args.rounds):
        for name in list(trainers) if round_index % 2 == 0 else list(trainers)[::-1]:
            trainers[name].time_steps(1)
            elapsed, _, _ = trainers[name].time_steps(args.steps)
            step_s[name].append(elapsed / args.steps)
    ratios = [fp32 / bf16 for bf16, fp32 in zip(step_s["bf16 stream"], step_s["fp32 stream"])]
    result: dict[str, Any] = {
        **record_header("residual_dtype", args),
        **step_summary(step_s),
        "fp32_over_bf16_stream_median": statistics.median(ratios),
    }
    print(
        f"# torch {torch.__version__}, preset {args.preset}, experts {args.experts}, {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds of {args.steps} steps, bf16-mixed"
    )
    for name in trainers:
        print(f"{name}: median {result[f'{name} step_ms_median']:.1f} ms, best {result[f'{name} step_ms_best']:.1f} ms")
    print(f"fp32 stream / bf16 stream (median of the rounds' ratios): {result['fp32_over_bf16_stream_median']:.3f}x")
    write_record(args.json, result)
    return result


if __name__ == "__main__":
    main()
