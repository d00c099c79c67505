"""benchmarks/quality.py: the run plan, one real run to its budget, and the verdicts drawn from hand-made numbers."""

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
BENCHMARKS = REPO / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_plan_orders_runs_after_their_sources_and_gives_equal_budgets():
    quality = _load("quality")
    runs = [r for r in quality.plan(quality.parse_args(["--seeds", "0", "1"])) if not r.arm.startswith("recipe-")]
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) == 2 * 15
    for r in runs:
        if r.init_from:
            assert names.index(r.init_from) < names.index(r.name)
            assert r.init_from.endswith(f"seed{r.seed}")
    by_name = {r.name: r for r in runs}
    for seed in (0, 1):
        full = by_name[f"multitask-moe8-seed{seed}"].budget_s
        assert {by_name[f"{arm}-seed{seed}"].budget_s for arm in ("multitask-dense", "single-moe8")} == {full}
        up = by_name[f"upcycle-dense-seed{seed}"].budget_s + by_name[f"upcycle-upcycled-seed{seed}"].budget_s
        assert up == by_name[f"upcycle-scratch-seed{seed}"].budget_s == full
        assert by_name[f"defr-finetuned-seed{seed}"].budget_s == by_name[f"defr-scratch-seed{seed}"].budget_s
    # the dense twin keeps k=2 (2x wider FFNs); upcycling needs the experts' width (k=1)
    assert "moe.k=2" in by_name["multitask-dense-seed0"].overrides
    assert "moe.k=1" in by_name["upcycle-dense-seed0"].overrides
    # bf16 against fp32: the same steps, no time budget, only the precision differs
    fp32, bf16 = by_name["precision-fp32-seed0"], by_name["precision-bf16-seed0"]
    assert fp32.budget_s == bf16.budget_s == float("inf") and "trainer.max_steps=600" in fp32.overrides
    assert {o for o in fp32.overrides if "precision" not in o} == {o for o in bf16.overrides if "precision" not in o}
    assert "trainer.precision=32-true" in fp32.overrides and "trainer.precision=bf16-mixed" in bf16.overrides
    fp32_residual = by_name["precision-bf16-fp32-residual-seed0"]
    assert set(fp32_residual.overrides) - set(bf16.overrides) == {"model.residual_in_compute_dtype=false"}


def test_recipe_settings_change_one_setting_of_the_shrunk_recipe_and_are_scored_on_val():
    from omegaconf import OmegaConf

    quality = _load("quality")
    recipe = OmegaConf.load(REPO / "conf" / "experiment" / "multi30k.yaml")  # the study reads the same file
    lr, warmup = recipe.optim.lr, recipe.optim.warmup_steps * 500 // recipe.trainer.max_steps
    runs = quality.plan(quality.parse_args(["--seeds", "0", "1", "--arms", *_recipe_arms(quality)]))
    assert [r.name for r in runs if r.arm == "recipe-base"] == ["recipe-base-seed0", "recipe-base-seed1"]
    assert len(runs) == 2 + 11 and all(r.seed == 0 for r in runs if r.arm != "recipe-base")
    assert all(r.splits == ("val",) and r.budget_s == float("inf") for r in runs)  # never the test sets

    def settings(arm: str) -> dict[str, str]:
        run = next(r for r in runs if r.arm == arm)
        return dict(o.split("=", 1) for o in run.overrides)  # later overrides win, as in Hydra

    base = settings("recipe-base")
    # 500 of the recipe's steps, its warm-up shrunk in proportion
    assert base["experiment"] == "multi30k" and base["trainer.max_steps"] == "500"
    assert base["optim.warmup_steps"] == str(warmup) and float(base["optim.lr"]) == lr
    changed = {arm: {k: v for k, v in settings(arm).items() if base.get(k) != v} for arm in {r.arm for r in runs}}
    assert changed["recipe-base"] == {}
    assert changed[f"recipe-lr{lr * 2:g}"] == {"optim.lr": f"{lr * 2:g}"}
    assert changed[f"recipe-warmup{warmup // 2}"] == {"optim.warmup_steps": str(warmup // 2)}
    assert changed["recipe-dropout0.3"] == {"model.dropout": "0.3"}
    assert changed["recipe-cosine"] == {"optim.schedule": "cosine"}
    assert changed["recipe-smoothing0"] == {"optim.label_smoothing": "0.0"}
    # half the tokens a step: twice the steps (and warm-up steps), the same tokens in all
    assert changed["recipe-batch2048"] == {
        "trainer.max_steps": "1000",
        "optim.warmup_steps": str(2 * warmup),
        "data.max_tokens": "2048",
    }
    assert all(len(c) == 1 for arm, c in changed.items() if "batch" not in arm and arm != "recipe-base")


def test_a_results_file_from_other_settings_is_refused_not_skipped(tmp_path: Path):
    quality = _load("quality")
    args = quality.parse_args(["--seeds", "0", "--arms", "recipe-base", "--out", str(tmp_path)])
    (run,) = quality.plan(args)
    path = tmp_path / "runs" / f"{run.name}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"overrides": list(run.overrides)}))
    quality.stale_result(args, run)  # the same settings: kept (skipped as done)
    path.write_text(json.dumps({"overrides": [*run.overrides[:-1], "optim.lr=0.5"]}))
    with pytest.raises(SystemExit, match="was run with other settings than the plan's recipe-base-seed0"):
        quality.stale_result(args, run)


def _recipe_arms(quality: ModuleType) -> list[str]:
    return sorted({r.arm for r in quality.plan(quality.parse_args([])) if r.arm.startswith("recipe-")})


def test_arms_keep_the_runs_they_start_from_and_refuse_unknown_names():
    quality = _load("quality")
    runs = quality.plan(quality.parse_args(["--seeds", "0", "--arms", "single-dense", "defr-finetuned"]))
    assert [r.name for r in runs] == [
        "multitask-moe8-seed0",  # defr-finetuned starts from it
        "single-dense-seed0",
        "defr-finetuned-seed0",
    ]
    with pytest.raises(SystemExit, match="no such arm.*multitask-dense"):
        quality.plan(quality.parse_args(["--arms", "multitask-moe7"]))


def _run_file(out: Path, arm: str, seed: int, nll: float, bleus: dict[tuple[str, str], float], steps: int = 100):
    run = {
        "name": f"{arm}-seed{seed}",
        "arm": arm,
        "seed": seed,
        "steps": steps,
        "train_cpu_s": 60.0,
        "train_wall_s": 61.0,
        "process_wall_s": 70.0,
        "history": [{"step": 50, "cpu_s": 30.0, "val_nll": nll + 0.5}, {"step": steps, "cpu_s": 60.0, "val_nll": nll}],
        "val_nll": nll,
        "test": [{"split": s, "direction": d, "bleu": b, "chrf": 40.0} for (s, d), b in bleus.items()],
        "params_total": 1000,
        "params_active": 500,
        "date": "2026-12-04 20:00 UTC",
        "machine": "test",
    }
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{run['name']}.json").write_text(json.dumps(run))


def _en_de(bleu: float) -> dict[tuple[str, str], float]:
    return {(split, "en-de"): bleu for split in ("test_2016_flickr", "test_2017_flickr")}


@pytest.mark.parametrize("moe_wins", [True, False])
def test_report_judges_the_claims_from_the_numbers(tmp_path: Path, moe_wins: bool):
    report_module = _load("quality_report")
    for seed in (0, 1):
        for i, arm in enumerate(("multitask-dense", "multitask-moe8", "multitask-moe16", "multitask-moe32")):
            # more experts: lower NLL when moe_wins, else higher
            _run_file(tmp_path, arm, seed, 3.0 - 0.1 * i if moe_wins else 3.0 + 0.1 * i, _en_de(20.0))
        _run_file(tmp_path, "multitask-moe8", seed, 2.9 if moe_wins else 3.1, _en_de(22.0 if moe_wins else 18.0))
        _run_file(tmp_path, "single-dense", seed, 2.5, _en_de(25.0))
        _run_file(tmp_path, "single-moe8", seed, 2.6, _en_de(24.0 if moe_wins else 26.0))
        _run_file(tmp_path, "precision-fp32", seed, 3.0 + 0.1 * seed, {})
        _run_file(tmp_path, "precision-bf16", seed, (3.0 + 0.1 * seed) * (1.005 if moe_wins else 1.03), {})
        _run_file(tmp_path, "precision-bf16-fp32-residual", seed, (3.0 + 0.1 * seed) * 0.998, {})
    text = report_module.write_report(tmp_path, {"model": "tiny"}).read_text()
    # bf16 0.5% (met) or 3% (not met) above fp32 at the last step; fp32 seeds 3.33% apart
    assert f"Goal (within 1%): **{'met' if moe_wins else 'not met'}**" in text
    assert ("+0.50%, +0.50%" if moe_wins else "+3.00%, +3.00%") in text and "end 3.33% apart" in text
    assert "(with the fp32 residual stream -0.20%, -0.20%)" in text and "| bf16, fp32 residual |" in text
    verdict = "**holds**" if moe_wins else "**does not hold**"
    assert f"Claim: {verdict} on the mean" in text
    assert f"'the MoE wins in multitask training': {verdict}" in text
    assert f"'the dense model does as well or better on a single task': {verdict}" in text
    assert "## 3. Fine-tuning" in text and "Not run yet (missing: ['defr-scratch', 'defr-finetuned'])" in text
    assert (tmp_path / "val_curves.png").read_bytes().startswith(b"\x89PNG")
    assert "(beyond the seed spread of 0.00)" in text  # the hand-made seeds agree
    assert "Handicap" not in text and "Scored again" not in text  # no run was rescored


def test_report_weighs_differences_against_the_seeds_and_shows_only_the_chosen_studies(tmp_path: Path):
    report_module = _load("quality_report")
    for seed, wobble in ((0, -1.0), (1, 1.0)):  # the seeds of each arm 2 BLEU apart
        _run_file(tmp_path, "multitask-dense", seed, 3.0, _en_de(20.0 + wobble))
        _run_file(tmp_path, "multitask-moe8", seed, 3.0, _en_de(23.0 + wobble))  # +3: beyond the spread
        _run_file(tmp_path, "single-dense", seed, 2.5, _en_de(25.0 + wobble))
        _run_file(tmp_path, "single-moe8", seed, 2.6, _en_de(25.5 + wobble))  # +0.5: within it
    text = report_module.write_report(tmp_path, {"arms": ["multitask-dense", "single-moe8"]}).read_text()
    assert "multitask training': **holds** (beyond the seed spread of 2.00)" in text
    assert "single task': **does not hold** (within the seed spread of 2.00)" in text
    assert "## 1. More experts" in text and "## 3. Fine-tuning" not in text and "## 5. bf16" not in text


def test_recipe_settings_report_weighs_each_setting_against_the_base_seeds(tmp_path: Path):
    report_module = _load("quality_report")

    def val(bleu: float) -> dict[tuple[str, str], float]:
        return {("val", d): bleu for d in ("en-de", "de-en")}

    _run_file(tmp_path, "recipe-base", 0, 2.0, val(30.0), steps=500)
    _run_file(tmp_path, "recipe-base", 1, 2.1, val(31.0), steps=500)  # seed spread: 1 BLEU
    _run_file(tmp_path, "recipe-lr0.002", 0, 1.9, val(33.0), steps=500)  # +2.5: beyond it
    _run_file(tmp_path, "recipe-dropout0", 0, 2.0, val(30.0), steps=500)  # -0.5: within it
    text = report_module.write_report(tmp_path, {"arms": ["recipe-base"]}).read_text()
    assert text.startswith("# The recipe's settings")
    assert "| recipe-lr0.002 | 500 | **33.00** (33.00) | +2.50 | 1.900 | -0.150 |" in text
    assert "lr0.002 +2.50 (beyond the seed spread of 1.00)" in text
    assert "dropout0 -0.50 (within the seed spread of 1.00)" in text
    assert "val en-de 30.00" in text


def test_report_lists_rescored_runs_with_their_earlier_scores(tmp_path: Path):
    report_module = _load("quality_report")
    for arm, nll, bleu in (("multitask-dense", 3.0, 20.0), ("multitask-moe8", 2.9, 22.0)):
        _run_file(tmp_path, arm, 0, nll, _en_de(bleu))
        path = tmp_path / "runs" / f"{arm}-seed0.json"
        run = json.loads(path.read_text())
        earlier_bleu = bleu if arm == "multitask-dense" else 15.0  # only the MoE's scores moved
        earlier = {"test": [{**t, "bleu": earlier_bleu} for t in run["test"]], "val_nll": nll + 0.02}
        path.write_text(json.dumps({**run, "earlier_scores": earlier}))
    text = report_module.write_report(tmp_path, {"model": "tiny"}).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| multitask-") and "->" in line]
    assert rows == [
        "| multitask-moe8-seed0 | 2.9200 -> 2.9000 | 2016 en-de 15.00 -> 22.00, 2017 en-de 15.00 -> 22.00 |"
    ]
    assert "Scored again with nothing changed: multitask-dense-seed0." in text
    assert "**Handicap:** the curves of multitask-moe8-seed0 were measured" in text
    assert "| multitask-moe8 | 1,000 | 500 | 100 | **2.900** (2.900) | **2.900** (2.900) |" in text  # the new scores


@pytest.mark.slow
def test_one_run_trains_to_its_budget_scores_and_resumes_its_clock(tmp_path: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", LIGHTNING_MOE_CACHE=str(tmp_path / "cache"))
    result_file = tmp_path / "out" / "runs" / "multitask-moe8-seed0.json"

    def one(budget_min: float) -> dict:
        args = [
            "--smoke",
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path / "work"),
            "--budget-min",
            str(budget_min),
        ]
        command = [sys.executable, str(BENCHMARKS / "quality.py"), *args, "--one", "multitask-moe8-seed0"]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result_file.read_text())

    first = one(0.05)
    assert 3.0 <= first["train_cpu_s"] < 12.0 and first["steps"] > 0
    assert first["history"][-1]["step"] == first["steps"]  # validated where the budget stopped it
    assert [(t["split"], t["direction"]) for t in first["test"]] == [
        ("test_2016_flickr", "en-de"),
        ("test_2016_flickr", "de-en"),
    ]
    assert first["params_active"] < first["params_total"]
    # a larger budget continues the same run from its checkpoint, with the CPU clock it had
    second = one(0.1)
    assert second["steps"] > first["steps"] and 6.0 <= second["train_cpu_s"] < 15.0
    # with every validation of the first part, also that of the step it stopped and was checkpointed on
    assert second["history"][: len(first["history"])] == first["history"]
    # --rescore scores the last checkpoint again: the same test rows, and through the module's own validation the
    # loss the run logged at its last step; what the file held before stays under earlier_scores
    stale = {**second, "test": [{**t, "bleu": -1.0} for t in second["test"]], "val_nll": 99.0}
    del stale["moe_evaluation"]
    result_file.write_text(json.dumps(stale))
    rescore = [sys.executable, str(BENCHMARKS / "quality.py"), "--smoke", "--out", str(tmp_path / "out")]
    rescore += ["--work", str(tmp_path / "work"), "--budget-min", "0.1", "--arms", "multitask-moe8", "--rescore"]
    result = subprocess.run(rescore, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    third = json.loads(result_file.read_text())
    assert third["test"] == second["test"] and third["moe_evaluation"] == "dropless"
    assert third["val_nll"] == pytest.approx(second["history"][-1]["val_nll"], abs=1e-4)
    assert third["earlier_scores"]["val_nll"] == 99.0 and third["earlier_scores"]["test"][0]["bleu"] == -1.0


def test_precision_report_shows_dashes_for_a_seed_the_fp32_residual_arm_has_not_reached(tmp_path: Path):
    report_module = _load("quality_report")
    for seed in (0, 1):
        _run_file(tmp_path, "precision-fp32", seed, 3.0, {})
        _run_file(tmp_path, "precision-bf16", seed, 3.03, {})
    _run_file(tmp_path, "precision-bf16-fp32-residual", 0, 2.97, {})
    text = report_module.write_report(tmp_path, {"arms": ["precision-fp32"]}).read_text()
    assert "| 1 | 100 | 3.0000 | 3.0300 | +1.00% | - | - |" in text
    assert "| 0 | 100 | 3.0000 | 3.0300 | +1.00% | 2.9700 | -1.00% |" in text
    assert "bf16 +1.00%, +1.00% against fp32 (with the fp32 residual stream -1.00%)" in text
