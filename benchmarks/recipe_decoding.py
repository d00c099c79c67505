"""Beam size, length penalty and checkpoint averaging for the Multi30k recipe, chosen on the validation split.

Scores every (checkpoint, beam size, length penalty) on the validation split (never the test sets, which only
report the choice), with the time each decoding took, and prints a table and the best setting per direction:

    python -m lightning_moe.checkpoint average runs/multi30k/checkpoints --last 2 -o runs/multi30k/avg2.ckpt
    python benchmarks/recipe_decoding.py --checkpoint last=runs/multi30k/checkpoints/step-004000.ckpt \\
        avg2=runs/multi30k/avg2.ckpt --beams 1 2 4 8 --data-root ../shared/data/multi30k
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def labelled(spec: str) -> tuple[str, str]:
    """``LABEL=PATH`` -> ``(LABEL, PATH)``; a bare path is labelled by its file name."""
    label, sep, path = spec.partition("=")
    return (label, path) if sep else (Path(spec).stem, spec)


def score_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (checkpoint, beam, length penalty, direction): BLEU, chrF and decoding seconds."""
    from lightning_moe.evaluate import EvaluateConfig, EvaluateDataConfig, evaluate

    rows = []
    for label, path in map(labelled, args.checkpoint):
        for beam in args.beams:
            for penalty in args.length_penalties if beam > 1 else args.length_penalties[:1]:
                began = time.perf_counter()
                scored = evaluate(
                    EvaluateConfig(
                        checkpoint=path,
                        data=EvaluateDataConfig(root=args.data_root),
                        splits=[args.split],
                        directions=list(args.directions),
                        beam_size=beam,
                        length_penalty=penalty,
                        max_sentences=args.max_sentences,
                    ),
                    progress=False,
                )
                seconds = time.perf_counter() - began
                for r in scored:
                    rows.append(
                        {
                            "checkpoint": label,
                            "path": path,
                            "beam": beam,
                            "length_penalty": penalty if beam > 1 else None,
                            "direction": r["direction"],
                            "split": r["split"],
                            "sentences": r["sentences"],
                            "bleu": r["bleu"],
                            "chrf": r["chrf"],
                            "decode_s": round(seconds / len(scored), 1),
                        }
                    )
                    print(
                        f"{label:<8} beam {beam} lp {penalty if beam > 1 else '-':<4} {r['direction']}: "
                        f"BLEU {r['bleu']:.2f} chrF {r['chrf']:.2f} ({seconds / len(scored):.0f} s)",
                        flush=True,
                    )
    return rows


def table(rows: Sequence[dict[str, Any]], directions: Sequence[str]) -> str:
    """Markdown table: one line per setting, BLEU per direction and their mean."""
    settings: dict[tuple[str, int, Any], dict[str, float]] = {}
    for r in rows:
        settings.setdefault((r["checkpoint"], r["beam"], r["length_penalty"]), {})[r["direction"]] = r["bleu"]
    lines = [
        f"| checkpoint | beam | length penalty | {' | '.join(directions)} | mean |",
        "|---|---|---|" + "---|" * (len(directions) + 1),
    ]
    for (label, beam, penalty), scores in settings.items():
        cells = [f"{scores[d]:.2f}" if d in scores else "-" for d in directions]
        mean = statistics.fmean(scores.values())
        lines.append(f"| {label} | {beam} | {'-' if penalty is None else penalty} | {' | '.join(cells)} | {mean:.2f} |")
    best = max(settings.items(), key=lambda item: statistics.fmean(item[1].values()))
    lines.append(
        f"\nBest mean BLEU on the validation split: {best[0][0]}, beam {best[0][1]}, length penalty {best[0][2]}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="+", required=True, help="LABEL=PATH (a checkpoint or an averaged file)")
    p.add_argument("--beams", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--length-penalties", type=float, nargs="+", default=[1.0], help="for beams > 1")
    p.add_argument("--directions", nargs="+", default=["en-de", "de-en"])
    p.add_argument("--split", default="val", help="where the choice is made (default: the validation split)")
    p.add_argument("--data-root", default=None, help="corpus folder (default: the one the checkpoint was trained on)")
    p.add_argument("--max-sentences", type=int, default=None, help="score the first N lines (default all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the rows and the machine to this file")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = score_all(args)
    print(table(rows, args.directions))
    if args.json:
        record = {
            "command": " ".join(["python benchmarks/recipe_decoding.py", *(argv or sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
            "threads": torch.get_num_threads(),
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
