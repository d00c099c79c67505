"""The GPU benchmarks' CPU modes: ``train_throughput.py``, ``model_scale.py`` and ``moe_layer.py`` run end to end on
tiny shapes, and their bookkeeping (active parameters, the scale summary, the running order) is right.
``gpu_check.sh`` parses."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import model_scale  # noqa: E402
import running_order  # noqa: E402
import step_products  # noqa: E402
import train_throughput  # noqa: E402

from lightning_moe.models import MoETransformer, get_preset  # noqa: E402


def _run(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_gpu_check_script_parses() -> None:
    subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_check.sh")], check=True)


# ------------------------------------------------------------------------------------- bookkeeping


def test_active_parameters_count_k_of_e_experts_and_the_output_projection_once() -> None:
    config = get_preset("tiny", vocab_size=100, num_experts=4, k=1)
    model = MoETransformer(config)
    counts = train_throughput.parameter_counts(model)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in model.parameters())
    assert counts["total"] == total and counts["experts"] == experts
    # Tied embeddings: the matrix counts once (as the output projection); sinusoidal positions have no parameters.
    assert counts["active"] == pytest.approx(total - experts * (1 - 1 / 4))
    encoder = sum(
        p.numel() * (0.25 if ".experts." in n else 1) for n, p in model.named_parameters() if n.startswith("encoder_")
    )
    cross_kv = sum(
        p.numel() for n, p in model.named_parameters() if ".cross_attn.k_proj." in n or ".cross_attn.v_proj." in n
    )
    assert counts["active_src"] == pytest.approx(encoder + cross_kv)


def test_step_flops_follow_the_6n_rule_per_side() -> None:
    model = MoETransformer(get_preset("tiny", vocab_size=100))
    counts = train_throughput.parameter_counts(model)
    flops = train_throughput.step_flops(model, batch_size=3, src_len=7, tgt_len=5)
    assert flops["src_tokens"] == 21 and flops["tgt_tokens"] == 15
    assert flops["model_flops"] == pytest.approx(6 * (counts["active_src"] * 21 + counts["active_tgt"] * 15))
    assert flops["attention_flops"] > 0


def test_scale_summary_compares_the_largest_models() -> None:
    runs = {
        "stage0-none": {
            "summary": {
                "largest_params": 100,
                "gpu_state_bytes_per_param": 16.0,
                "peak_gpu_bytes_per_param": 20.0,
                "stop_reason": "E=16 failed: out of memory",
            }
        },
        "stage3-params": {
            "summary": {
                "largest_params": 300,
                "gpu_state_bytes_per_param": 0.0,
                "peak_gpu_bytes_per_param": 2.0,
                "stop_reason": "host memory guard: E=64 needs ...",
            }
        },
    }
    summary = model_scale._compare(runs)
    assert summary["stage3-params_params_ratio"] == 3.0
    assert summary["stage3-params_goal_8x_met"] is False
    assert summary["stage3-params_limited_by"] == "host memory"
    assert summary["stage3-params_peak_gpu_bytes_per_param_reduction"] == 10.0
    assert "stage3-params_gpu_state_bytes_per_param_reduction" not in summary  # nothing resident: no finite ratio


# ------------------------------------------------------------------------------------- end to end


# A tiny model on 4 sentence pairs of 12 + 10 tokens: the throughput benchmark's arguments shared by its tests.
TINY_THROUGHPUT = "--device cpu --preset tiny --vocab 256 --batch-size 4 --src-len 12 --tgt-len 10".split()


@pytest.mark.slow
def test_train_throughput_runs_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    proc = _run("train_throughput.py", *TINY_THROUGHPUT, *"--steps 2 --warmup 1 --threads 1 --json".split(), str(out))
    result = json.loads(out.read_text())
    assert "tokens/s" in proc.stdout and "MFU" in proc.stdout
    assert result["tokens_per_step"] == 4 * (12 + 10)
    assert result["tokens_per_s"] > 0 and result["model_tflops_per_s"] > 0
    # On CPU utilisation is taken against the matrix-product rate measured in the run's dtype (fp32 here).
    assert result["peak_tflops"] == result["measured_fp32_tflops"] > 0 and result["measured_bf16_tflops"] > 0
    assert result["mfu"] == pytest.approx(result["model_tflops_per_s"] / result["peak_tflops"])
    assert 0 < result["params_active"] < result["params_total"]
    assert result["loss_finite"] and result["peak_memory_gib"] > 0
    assert result["config"]["precision"] == "32-true" and result["environment"]["device"] == "cpu"


@pytest.mark.slow
def test_residual_dtype_times_both_streams_and_reports_their_ratio(tmp_path: Path) -> None:
    out = tmp_path / "residual.json"
    options = "--threads 1 --warmup 1 --steps 1 --rounds 2 --json".split()
    assert "fp32 stream / bf16 stream" in _run("residual_dtype.py", *TINY_THROUGHPUT, *options, str(out)).stdout
    result = json.loads(out.read_text())
    assert result["bf16 stream step_ms_median"] > 0 and result["fp32 stream step_ms_median"] > 0
    assert result["fp32_over_bf16_stream_median"] > 0


def test_expert_weight_casts_times_fresh_and_kept_casts_on_the_same_layer(tmp_path: Path) -> None:
    out = tmp_path / "casts.json"
    options = "--threads 1 --warmup 1 --rounds 2 --tokens 64 --shapes 16:32:4:2 --json".split()
    assert "fresh/kept" in _run("expert_weight_casts.py", *options, str(out)).stdout
    (row,) = json.loads(out.read_text())["rows"]
    assert row["shape"] == "16:32:4:2"
    assert row["fresh casts step_ms_median"] > 0 and row["kept casts step_ms_median"] > 0
    assert row["fresh_over_kept_median"] > 0


def test_attention_mask_times_both_versions_for_each_mask(tmp_path: Path) -> None:
    out = tmp_path / "attention.json"
    options = "--threads 1 --rounds 2 --batch-size 2 --length 8 --heads 2 --head-dim 4 --json".split()
    assert "before/now" in _run("attention_mask.py", *options, str(out)).stdout
    rows = json.loads(out.read_text())["rows"]
    assert [row["kind"] for row in rows] == ["padding", "causal", "none"]
    assert all(row["before step_ms_median"] > 0 and row["now step_ms_median"] > 0 for row in rows)


@pytest.mark.parametrize("kind", ["padding", "causal", "none"])
def test_attention_mask_reference_computes_what_attend_computes(kind: str) -> None:
    # The benchmark's "before" is the former short path of attend: same outputs and gradients in float64.
    import attention_mask

    q, k, v, mask = attention_mask._inputs(kind, 3, 8, 2, 4, torch.float64)
    grad = torch.randn(3, 2, 8, 4, dtype=torch.float64)
    results = []
    for fn in (attention_mask.attend_masked_fill, attention_mask.attend):
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v, mask)
        out.backward(grad)
        results.append([out.detach()] + [t.grad.clone() for t in (q, k, v)])
    for before, now in zip(*results):
        torch.testing.assert_close(before, now)


def test_loss_chunks_times_each_size_against_the_shipped_one(tmp_path: Path) -> None:
    out = tmp_path / "loss.json"
    options = "--threads 1 --rounds 2 --tokens 12 --vocab 50 --sizes 50 100 --json".split()
    assert "vs shipped" in _run("loss_chunks.py", *options, str(out)).stdout
    rows = json.loads(out.read_text())["rows"]
    assert [row["rows"] for row in rows][:2] == [1, 2]  # one thread: the per-thread size is the chunk
    assert all(row["ms_median"] > 0 and row["shipped_over_this_median"] > 0 for row in rows)


def test_fresh_cast_memory_hands_out_new_blocks_for_casts_only() -> None:
    # The benchmark's reference: a plain .to() cast, while the kernel's own gradients stay in kept memory.
    import expert_weight_casts

    memory = expert_weight_casts.FreshCastMemory()
    like = torch.empty(4, 3)
    first = memory.empty("w1", like).data_ptr()
    assert memory.empty("w1", like).data_ptr() == first  # the kernel's gradients: kept
    assert memory.empty("w1.cast", like, torch.bfloat16).dtype == torch.bfloat16
    assert memory.nbytes() == like.numel() * 4  # nothing kept for the casts


def test_step_products_records_each_product_once_with_its_flops_and_layout() -> None:
    a, b, bias = torch.randn(8, 5), torch.randn(6, 5), torch.randn(6)
    batch_a, batch_b = torch.randn(3, 4, 5), torch.randn(3, 5, 2)
    out = torch.empty(8, 6)
    recorder = step_products.ProductRecorder()
    with recorder:
        torch.mm(a, b.t())  # [8, 5] @ [5, 6] with a transposed second operand
        torch.addmm(bias, a, b.t())
        torch.bmm(batch_a, batch_b)
        torch.mm(a, b.t(), out=out)
        (a + 1.0).sum()  # not a product: not recorded
    described = {step_products._describe(key): key for key in recorder.calls}
    assert set(described) == {"mm 8x5 @ 5x6(T)", "addmm 8x5 @ 5x6(T)", "bmm 3x4x5 @ 3x5x2"}
    assert sum(recorder.calls.values()) == 4  # the out= form is recorded apart from the plain mm
    flops = {name: step_products.product_flops(key[0], list(key[1])) for name, key in described.items()}
    assert flops == {
        "mm 8x5 @ 5x6(T)": 2 * 8 * 5 * 6,
        "addmm 8x5 @ 5x6(T)": 2 * 8 * 5 * 6,
        "bmm 3x4x5 @ 3x5x2": 2 * 3 * 4 * 5 * 2,
    }
    out_key = next(key for key in recorder.calls if key[2] is not None)
    assert step_products.replay_seconds(out_key, repeats=2) > 0


@pytest.mark.slow
def test_step_products_reports_the_products_share_and_both_ceilings(tmp_path: Path) -> None:
    out = tmp_path / "products.json"
    options = "--threads 1 --warmup 1 --steps 1 --recorded-steps 1 --repeats 2 --json".split()
    assert (
        "MFU ceiling" in _run("step_products.py", *TINY_THROUGHPUT[2:], *options, str(out)).stdout
    )  # CPU only: no --device
    result = json.loads(out.read_text())
    assert 0.5 < result["coverage"] < 1.5  # the recorded products are the model's and attention's FLOPs
    assert 0 < result["products_share_of_step"] < 1
    assert result["mfu_ceiling_in_step_rates"] > result["mfu"]  # the step also does other work
    assert result["products_in_step_ms"] == pytest.approx(sum(r["in_step_s"] for r in result["rows"]) * 1e3)


def test_train_throughput_takes_the_best_peak_measured_before_and_after_the_steps(monkeypatch) -> None:
    # An idle CPU runs its first products slowly: a peak measured only at start-up would inflate the MFU.
    rates = iter([0.1, 0.2, 1.0, 2.0])  # fp32 then bf16, before the steps; fp32 then bf16, after them
    monkeypatch.setattr(train_throughput, "measure_matmul_tflops", lambda dtype, *args, **kwargs: next(rates))
    threads = torch.get_num_threads()
    try:
        result = train_throughput.main([*TINY_THROUGHPUT, *"--steps 1 --warmup 0 --precision bf16-mixed".split()])
    finally:
        torch.set_num_threads(threads)
    assert (result["measured_fp32_tflops"], result["measured_bf16_tflops"], result["peak_tflops"]) == (1.0, 2.0, 2.0)
    assert result["mfu"] == pytest.approx(result["model_tflops_per_s"] / 2.0)


@pytest.mark.slow
@pytest.mark.parametrize("one_process", [False, True], ids=["process-per-variant", "one-process"])
def test_train_throughput_side_by_side_interleaves_three_variants(tmp_path: Path, one_process: bool) -> None:
    out = tmp_path / "side.json"
    options = "--steps 1 --warmup 1 --threads 1 --side-by-side 2 --round-warmup 2 --retain-freed-memory".split()
    options += ["--one-process"] if one_process else []
    options += "--peak-tflops 2.0 --json".split()
    proc = _run("train_throughput.py", *TINY_THROUGHPUT, *options, str(out))
    result = json.loads(out.read_text())
    variants = result["variants"]
    assert list(variants) == ["MoE 32-true", "MoE bf16-mixed", "dense bf16-mixed"]
    assert [v["experts"] for v in variants.values()] == [8, 8, 0] and all(
        len(v["step_s"]) == 2 for v in variants.values()
    )
    moe_fp32, moe_bf16, dense = variants.values()
    assert result["ratios"]["bf16_over_fp32_median"] == pytest.approx(
        moe_bf16["tokens_per_s_median"] / moe_fp32["tokens_per_s_median"]
    )
    assert result["ratios"]["moe_over_dense_bf16_best"] == pytest.approx(
        moe_bf16["tokens_per_s_best"] / dense["tokens_per_s_best"]
    )
    assert moe_bf16["utilisation_of_bf16_peak_median"] == pytest.approx(moe_bf16["model_tflops_per_s_median"] / 2.0)
    assert dense["dropped_fraction"] == 0.0 and 0.0 <= moe_bf16["dropped_fraction"] < 1.0
    assert "bf16 / fp32 (MoE)" in proc.stdout
    assert "malloc retains freed memory" in proc.stdout and result["config"]["round_warmup"] == 2
    assert result["isolation"] == ("one process" if one_process else "a process per variant")


@pytest.mark.slow
def test_model_scale_grows_experts_until_a_failure_then_refines(tmp_path: Path) -> None:
    """Doubling 2 -> 4 -> 8 (a simulated out-of-memory above 6 experts), then the size halfway (6) is tried."""
    out = tmp_path / "scale.json"
    _run(
        "model_scale.py",
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--vocab",
        "256",
        "--batch-size",
        "2",
        "--src-len",
        "8",
        "--tgt-len",
        "8",
        "--experts-start",
        "2",
        "--simulate-oom-above",
        "6",
        "--configs",
        "3:params",
        "--threads",
        "1",
        "--time-budget",
        "200",
        "--json",
        str(out),
        timeout=300,
    )
    result = json.loads(out.read_text())
    run = result["runs"]["stage3-params"]
    assert [(a["experts"], a["ok"]) for a in run["attempts"]] == [(2, True), (4, True), (8, False), (6, True)]
    assert run["attempts"][2]["error"] == "out of memory"
    summary = run["summary"]
    assert summary["largest_experts"] == 6 and summary["stop_reason"].startswith("E=8 failed: out of memory")
    best = next(a for a in run["attempts"] if a["experts"] == 6)
    # fp32 parameters + gradients + two AdamW moments, all in host memory: 16 bytes per parameter.
    assert best["state_bytes_by_device"]["cpu"] == pytest.approx(16 * best["params"], rel=1e-3)
    assert torch.isfinite(torch.tensor(best["loss"]))


@pytest.mark.parametrize("count", [2, 3, 4, 5])
def test_side_by_side_order_puts_every_contender_after_every_other_equally_often(count: int) -> None:
    names = [f"c{i}" for i in range(count)]
    rounds = count if count % 2 == 0 else 2 * count
    orders = [running_order.running_order(names, turn) for turn in range(rounds)]
    assert all(sorted(order) == names for order in orders)
    pairs = [(order[i - 1], order[i]) for order in orders for i in range(1, count)]
    expected = rounds * (count - 1) // (count * (count - 1))  # each ordered pair of distinct contenders
    assert {pair: pairs.count(pair) for pair in set(pairs)} == {
        (a, b): expected for a in names for b in names if a != b
    }
    assert sorted(order[0] for order in orders[:count]) == names  # and each runs first once


def test_time_in_rounds_times_one_step_per_contender_per_round_after_its_untimed_ones() -> None:
    calls: list[str] = []

    def step(name: str) -> float:
        calls.append(name)
        return float(len(calls))  # the call's position stands for its duration

    times = running_order.time_in_rounds({name: functools.partial(step, name) for name in ("a", "b")}, 2, untimed=1)
    assert calls == ["a", "a", "b", "b", "b", "b", "a", "a"]  # the order turns each round
    assert times == {"a": [2.0, 8.0], "b": [4.0, 6.0]}  # only the step after the untimed one counts


@pytest.mark.slow
def test_moe_layer_benchmark_runs_on_cpu_with_peers(tmp_path: Path) -> None:
    out = tmp_path / "layer.json"
    options = "--tokens 64 --hidden 16 --ffn 32 --experts 4 --k 1 2 --repeats 2 --warmup 1 --round-warmup 2"
    proc = _run("moe_layer.py", *options.split(), *"--threads 1 --peers --no-memory --json".split(), str(out))
    rows = json.loads(out.read_text())
    assert [(row["E"], row["k"]) for row in rows] == [(4, 1), (4, 2)]
    for row in rows:
        for name in ("moe", "per_expert_loop", "onehot_einsum"):
            assert row[f"{name}_efficiency"] > 0 and row[f"{name}_ms"] > 0
    assert "2 untimed step(s) before each timed one" in proc.stdout


@pytest.mark.slow
def test_expert_shapes_times_fixed_changing_and_rounded_row_counts() -> None:
    options = "--threads 1 --experts 4 --rounds 2 --width 16 --hidden 32 --rows 70 --rows-min 65 --rows-max 90"
    proc = _run("expert_shapes.py", *options.split())
    lines = [line.split()[0] for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert lines == ["fixed", "changing", "rounded"] and "x fixed" in proc.stdout


@pytest.mark.slow
def test_expert_backward_layout_times_both_ways_round(tmp_path: Path) -> None:
    out = tmp_path / "layout.json"
    options = f"--threads 1 --rounds 1 --shapes ffn:2:8:16:32 glu:2:8:16:32 --json {out}"
    proc = _run("expert_backward_layout.py", *options.split())
    rows = json.loads(out.read_text())["rows"]
    assert [row["shape"] for row in rows] == ["ffn:2:8:16:32", "glu:2:8:16:32"]
    assert all(row["rows_ms"] > 0 and row["cols_ms"] > 0 and row["rule_picks"] == "rows" for row in rows)
    assert "rows/cols" in proc.stdout


@pytest.mark.slow
def test_side_by_side_variant_process_error_reaches_the_caller() -> None:
    options = "--preset tiny --device cpu --threads 1 --experts 4 --k 6 --side-by-side 1 --steps 1 --warmup 0"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_throughput.py"), *options.split(), "--peak-tflops", "1"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("Traceback") == 1 and "moe.k=6 is larger than moe.num_experts=4" in proc.stderr
