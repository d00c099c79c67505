"""The report of ``benchmarks/quality.py``: ``results.json``, ``val_curves.png`` and ``report.md``.

``benchmarks/quality.py`` calls :func:`write_outputs` at its end; this module also re-renders the plot and
the markdown from an existing ``results.json`` (e.g. after editing the wording)::

    python benchmarks/quality_report.py benchmarks/results/quality/results.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_val_curves", "markdown_report", "write_outputs", "main"]

COLORS = {"dense": "black"}


def _name(label: str) -> str:
    """Display name of a run label: ``dense`` -> ``dense``, ``moe8`` -> ``MoE-8``."""
    return "dense" if label == "dense" else f"MoE-{label.removeprefix('moe')}"


def plot_val_curves(result: dict[str, Any], path: Path) -> Path:
    """One plot: validation NLL against training step, one curve per run (the dense run's steps past
    ``--steps``, trained for the equal wall-clock comparison, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["settings"]["steps"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run in result["runs"]:
        curve = run["val_curve"]
        inside = [(s, v) for s, v in curve if s <= steps]
        color = COLORS.get(run["label"])
        label = (
            f"{_name(run['label'])} ({run['params_total'] / 1e6:.2f}M params, {run['params_active'] / 1e6:.2f}M active)"
        )
        line = ax.plot(*zip(*inside), marker="o", markersize=3, label=label, color=color)[0] if inside else None
        beyond = [(s, v) for s, v in curve if s >= steps]
        if line is not None and len(beyond) > 1:
            ax.plot(
                *zip(*beyond),
                linestyle="--",
                linewidth=1,
                color=line.get_color(),
                label=f"{_name(run['label'])} past {steps} steps (equal wall-clock)",
            )
    ax.axvline(steps, color="grey", linewidth=0.5)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation NLL (nats/token)")
    ax.set_title("Multi30k, all en/de/fr directions + denoising", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _met(goal: dict[str, Any]) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[goal.get("met")]


def _scores_table(result: dict[str, Any]) -> list[str]:
    runs = result["runs"]
    keys = sorted({(r["split"], r["direction"]) for run in runs for r in run["tests"]})
    head = "| split | direction | sentences | " + " | ".join(f"{_name(r['label'])} BLEU / chrF" for r in runs) + " |"
    lines = [head, "|" + "---|" * (3 + len(runs))]
    index = [{(r["split"], r["direction"]): r for r in run["tests"]} for run in runs]
    for key in keys:
        sentences = next(i[key]["sentences"] for i in index if key in i)
        cells = [f"{i[key]['bleu']:.2f} / {i[key]['chrf']:.2f}" if key in i else "n/a" for i in index]
        lines.append(f"| {key[0]} | {key[1]} | {sentences} | " + " | ".join(cells) + " |")
    means = []
    for i in index:
        means.append(
            f"{sum(r['bleu'] for r in i.values()) / len(i):.2f} / {sum(r['chrf'] for r in i.values()) / len(i):.2f}"
            if i
            else "n/a"
        )
    lines.append("| **mean** | | | " + " | ".join(means) + " |")
    return lines


def _runs_table(result: dict[str, Any]) -> list[str]:
    inter = result.get("interleaved") or {}
    medians = inter.get("ratio_median", {})
    per_round = inter.get("ratio_per_round", {})
    lines = [
        "| model | params (total) | params (active/token) | val NLL @ steps | train s (CPU s) | validation s | run wall s | tokens/s | ratio in run: wall (CPU) | ratio interleaved: median [min, max] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        rounds = per_round.get(r["label"], [])
        spread = f" [{min(rounds):.2f}, {max(rounds):.2f}]" if rounds else ""
        lines.append(
            f"| {_name(r['label'])} | {r['params_total']:,} | {r['params_active']:,} | {_fmt(r['val_nll_at_steps'], 3)} | "
            f"{r['train_seconds']:.0f} ({r['train_cpu_seconds']:.0f}) | {r['validation_seconds']:.0f} | {r['wall_seconds']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {r['throughput_ratio']:.2f} ({r['throughput_ratio_cpu']:.2f}) | "
            f"{_fmt(medians.get(r['label']))}{spread} |"
        )
    return lines


def _equal_wall_clock(result: dict[str, Any]) -> list[str]:
    eq = result.get("equal_wall_clock")
    if not eq:
        return [
            "No equal wall-clock checkpoint of the dense run (no MoE reference run, or the dense run hit its step cap)."
        ]
    steps = result["settings"]["steps"]
    ref = next((r for r in result["runs"] if r["label"] == eq["reference"]), None)
    clock = eq.get("clock", "wall")
    lines = [
        f"The {_name(eq['reference'])} run trained {steps} steps in {eq['reference_train_seconds']:.1f} s of training wall time "
        f"({eq.get('reference_train_cpu_seconds', float('nan')):.1f} CPU s; validation excluded). The dense run went on past "
        f"{steps} steps where needed (same seed, same batches, learning rate independent of the run length) and was "
        f"checkpointed at the step nearest the same {clock} time: step {eq['dense_step']}, after {eq['dense_train_seconds']:.1f} s "
        f"({eq.get('dense_train_cpu_seconds', float('nan')):.1f} CPU s)"
        + (" (its step cap, --max-dense-factor: it had not reached the reference time)" if eq.get("capped") else "")
        + ".",
        "",
        "| split | direction | dense @ equal wall-clock BLEU / chrF | "
        + f"{_name(eq['reference'])} @ {steps} steps BLEU / chrF |",
        "|---|---|---|---|",
    ]
    ref_rows = {(r["split"], r["direction"]): r for r in (ref or {}).get("tests", [])}
    for row in eq["rows"]:
        other = ref_rows.get((row["split"], row["direction"]))
        lines.append(
            f"| {row['split']} | {row['direction']} | {row['bleu']:.2f} / {row['chrf']:.2f} | "
            + (f"{other['bleu']:.2f} / {other['chrf']:.2f} |" if other else "n/a |")
        )
    return lines


def _goals(result: dict[str, Any]) -> list[str]:
    g = result["goals"]
    loss, bleu, speed = g["moe_below_dense_val_loss"], g["bleu_gain_en_de_2016"], g["throughput"]
    lines = [f"1. Every MoE run below the dense validation loss at equal steps: {_met(loss)}."]
    for label, v in loss["runs"].items():
        lines.append(
            f"   - {_name(label)}: val NLL {_fmt(v['val_nll'], 3)} vs dense {_fmt(v['dense_val_nll'], 3)} at {result['settings']['steps']} steps; "
            f"below dense at {v['validations_below_dense']} validations."
        )
    lines.append(
        f"2. {_name(result['settings']['reference'])} at least +1 BLEU over dense on en->de test_2016_flickr at equal wall-clock: {_met(bleu)} "
        f"(gain {_fmt(bleu['gain_equal_wall_clock'])} BLEU at equal training wall-clock; {_fmt(bleu['gain_equal_steps'])} at equal steps)."
    )
    lines.append(f"3. MoE training throughput >= 0.8x dense: {_met(speed)}.")
    for label, ratio in speed["interleaved"].items():
        lines.append(
            f"   - {_name(label)}: {_fmt(ratio)}x interleaved (median), {_fmt(speed['in_run'][label])}x over its whole run."
        )
    return lines


def markdown_report(result: dict[str, Any]) -> str:
    """``report.md``: the goals, the score table, the throughput ratios, the command and the machine."""
    s, m = result["settings"], result["machine"]
    inter = result.get("interleaved") or {}
    lines = [
        "# Does the MoE pay off? MoE against its dense twin on Multi30k",
        "",
        f"Model preset `{s['model']}`, top-{s['k']} routing, experts {sorted(s['experts'])} (0 = the dense twin: the FFNs at "
        f"MoE positions are {s['k']}x wider, the same active parameters per token). Every model: {s['steps']} steps, "
        f"seed {s['seed']}, the same batches (data.max_tokens={s['max_tokens']}, data.max_len={s['max_len']}, vocabulary "
        f"{s['vocab_size']}), validation every {s['val_every']} steps. Task mixture `conf/tasks/all_directions.yaml`: "
        "translation en<->de, en<->fr, de<->fr and denoising of en, de, fr (half weight)."
        + (" **Smoke run: tiny model and data, the numbers mean nothing.**" if s.get("smoke") else ""),
        "",
        "## Goals",
        "",
        *_goals(result),
        "",
        "## Validation loss",
        "",
        "![validation NLL](val_curves.png)",
        "",
        "## Test scores (greedy, sacreBLEU; at " + f"{s['steps']} steps)",
        "",
        f"At most {s['max_test_sentences'] or 'all'} sentences per split and direction (the first ones of the file).",
        "",
        *_scores_table(result),
        "",
        "## Equal wall-clock",
        "",
        *_equal_wall_clock(result),
        "",
        "## Size and training throughput",
        "",
        "tokens/s = non-padding source + target tokens of the training batches / training wall time without validation, "
        f"over the first {s['steps']} steps of each run; ratios are relative to the dense twin. Interleaved: in one process "
        f"the trained models took turns of {inter.get('steps_per_turn')} training steps (forward, backward, clipping, AdamW) "
        f"on the same {inter.get('tokens_per_turn')} tokens, for {inter.get('rounds')} rounds (order reversed every other round); "
        "the ratio of each round is dense time / model time.",
        "",
        *_runs_table(result),
        "",
        f"## Expert load ({_name(s['reference'])}, last validation)",
        "",
        f"![expert load](expert_load_{s['reference']}.png)",
        "",
        f"Source: `{result.get('heatmap_source')}`.",
        "",
        "## How this was run",
        "",
        "```",
        result["command"],
        "```",
        "",
        f"- machine: {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
        f"lightning {m['lightning']}, Python {m['python']}, {m['platform']}",
        f"- date: {m['date']}; load average at start {m.get('load_average_start')}, at end {m.get('load_average_end')}",
        f"- total wall time: {result['total_wall_seconds'] / 60:.1f} min ("
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in result.get("phase_seconds", {}).items())
        + ")",
        f"- how the default run length was chosen: {result.get('timing_note', '')}",
        "",
    ]
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """Write ``results.json``, ``val_curves.png`` and ``report.md`` into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    results.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot = plot_val_curves(result, out / "val_curves.png")
    report = out / "report.md"
    report.write_text(markdown_report(result), encoding="utf-8")
    return [results, plot, report]


def main(argv: Sequence[str] | None = None) -> int:
    """Re-render the plot and report.md next to an existing results.json."""
    parser = argparse.ArgumentParser(description="re-render the quality benchmark's report from results.json")
    parser.add_argument("results", help="results.json written by benchmarks/quality.py")
    args = parser.parse_args(argv)
    path = Path(args.results)
    result = json.loads(path.read_text(encoding="utf-8"))
    for written in write_outputs(result, path.parent):
        print(written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
