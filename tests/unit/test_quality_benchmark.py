"""benchmarks/quality.py: the smoke version end to end, and the goal bookkeeping on hand-made numbers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "quality.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quality_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path) -> subprocess.CompletedProcess:
    from lightning_moe.data.download import SAMPLE_DIR

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", LIGHTNING_MOE_CACHE=str(tmp_path / "cache"))
    command = [sys.executable, str(SCRIPT), "--smoke", "--data-root", str(SAMPLE_DIR), "--out", str(tmp_path / "out")]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_smoke_run_writes_results_plots_and_report(tmp_path: Path):
    result = _run(tmp_path)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    out = tmp_path / "out"
    for name in ("val_curves.png", "expert_load_moe8.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, name

    results = json.loads((out / "results.json").read_text())
    assert {
        "command",
        "machine",
        "settings",
        "runs",
        "equal_wall_clock",
        "interleaved",
        "goals",
        "total_wall_seconds",
    } <= set(results)
    assert results["settings"]["smoke"] is True and results["machine"]["torch"]
    runs = {r["label"]: r for r in results["runs"]}
    assert list(runs) == ["dense", "moe8", "moe16"]
    steps = results["settings"]["steps"]
    for run in runs.values():
        assert run["steps"] == steps and run["tokens"] > 0 and run["tokens_per_s"] > 0
        assert steps in [step for step, _ in run["val_curve"]] and run["val_nll_at_steps"] is not None
        assert {(r["split"], r["direction"]) for r in run["tests"]} == {
            ("test_2016_flickr", d) for d in ("en-de", "de-en", "en-fr", "fr-en", "de-fr", "fr-de")
        }
        assert all(0 <= r["bleu"] <= 100 and 0 <= r["chrf"] <= 100 and r["sentences"] == 8 for r in run["tests"])
    # same active parameters per token (routers aside), more in total with more experts
    assert abs(runs["moe8"]["params_active"] - runs["dense"]["params_active"]) < 0.05 * runs["dense"]["params_active"]
    assert runs["dense"]["params_total"] < runs["moe8"]["params_total"] < runs["moe16"]["params_total"]
    assert runs["dense"]["throughput_ratio"] == 1.0
    assert runs["dense"]["steps_trained"] >= steps  # the dense run may go on to the MoE-8 wall time

    equal = results["equal_wall_clock"]
    assert equal["reference"] == "moe8" and equal["rows"][0]["direction"] == "en-de"
    ratios = results["interleaved"]["ratio_median"]
    assert set(ratios) == {"dense", "moe8", "moe16"} and ratios["dense"] == 1.0 and ratios["moe8"] > 0
    assert {"moe_below_dense_val_loss", "bleu_gain_en_de_2016", "throughput"} == set(results["goals"])
    assert all(g["met"] in (True, False) for g in results["goals"].values())

    report = (out / "report.md").read_text()
    for text in (
        "## Goals",
        "| split | direction |",
        "en-de",
        "expert_load_moe8.png",
        "val_curves.png",
        "--smoke",
        "torch",
    ):
        assert text in report, text


def _record(
    dense_nll: float, moe_nll: float, dense_bleu: float, moe_bleu: float, equal_bleu: float, ratio: float
) -> dict:
    def run(label: str, experts: int, nll: float, bleu: float) -> dict:
        tests = [{"split": "test_2016_flickr", "direction": "en-de", "sentences": 10, "bleu": bleu, "chrf": 30.0}]
        return {
            "label": label,
            "experts": experts,
            "val_curve": [(50, nll + 1), (100, nll)],
            "val_nll_at_steps": nll,
            "tests": tests,
            "throughput_ratio": ratio,
        }

    return {
        "settings": {"steps": 100, "reference": "moe8"},
        "runs": [run("dense", 0, dense_nll, dense_bleu), run("moe8", 8, moe_nll, moe_bleu)],
        "equal_wall_clock": {"rows": [{"split": "test_2016_flickr", "direction": "en-de", "bleu": equal_bleu}]},
        "interleaved": {"ratio_median": {"dense": 1.0, "moe8": ratio}},
    }


def test_goals_are_judged_from_the_numbers():
    quality = _load_benchmark()
    met = quality.goals(
        _record(dense_nll=3.0, moe_nll=2.9, dense_bleu=20.0, moe_bleu=21.5, equal_bleu=20.4, ratio=0.85)
    )
    assert met["moe_below_dense_val_loss"]["met"] is True
    assert met["moe_below_dense_val_loss"]["runs"]["moe8"]["validations_below_dense"] == "2/2"
    assert met["bleu_gain_en_de_2016"]["met"] is True
    assert met["bleu_gain_en_de_2016"]["gain_equal_wall_clock"] == pytest.approx(1.1)
    assert met["bleu_gain_en_de_2016"]["gain_equal_steps"] == pytest.approx(1.5)
    assert met["throughput"]["met"] is True

    missed = quality.goals(
        _record(dense_nll=3.0, moe_nll=3.1, dense_bleu=20.0, moe_bleu=21.5, equal_bleu=20.9, ratio=0.7)
    )
    assert [missed[k]["met"] for k in ("moe_below_dense_val_loss", "bleu_gain_en_de_2016", "throughput")] == [
        False,
        False,
        False,
    ]


def test_arguments_need_the_dense_twin():
    quality = _load_benchmark()
    with pytest.raises(SystemExit):
        quality.parse_args(["--smoke", "--experts", "8", "16"])
    args = quality.parse_args(["--smoke"])
    assert args.experts == [0, 8, 16] and args.steps % args.val_every == 0
