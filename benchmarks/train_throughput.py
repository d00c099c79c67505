"""Training throughput of the MoE encoder-decoder transformer on synthetic token batches.

A plain PyTorch loop (no Lightning, no data loading, nothing downloaded): build the model from a preset
(with overrides), AdamW, ``--warmup`` steps, then ``--steps`` timed steps on a few pre-generated random
batches kept on the device (different batches, so the routing changes from step to step). Reported:

* ``tokens_per_s``: source + target tokens per second (every token is real: no padding);
* ``model_tflops_per_s``: model FLOPs per second, where one step costs
  ``6 x (N_enc x source tokens + N_dec x target tokens)``: ``N_enc`` / ``N_dec`` are the *active*
  parameters each token passes through on its side (expert weights count ``k / E``; the cross-attention
  key/value projections run on the source side; embedding look-ups count nothing; the tied output
  projection counts on the target side). With equal source and target lengths this is
  ``6 x active params x target tokens/s``; attention scores (``QK^T``, ``AV``) are left out, as in the
  usual ``6N`` rule, and reported apart as ``attention_tflops_per_s``;
* ``mfu``: ``model_tflops_per_s / peak``: ``--peak-tflops``, by default 989 on CUDA (dense bf16 on H100 SXM /
  H200) and on CPU the rate of one large matrix product in the precision's dtype (fp32 for 32-true, bf16
  otherwise: AMX / AVX512-BF16 where the CPU has them), measured before and after the timed steps, the higher
  counting (a CPU that was idle runs its first products at a fraction of its rate); both rates are in the record;
* ``peak_memory_gib``: ``torch.cuda.max_memory_allocated`` over the run (model, optimizer, activations);
  on CPU the process's peak resident set size instead;
* ``dropped_fraction``: mean share of routed assignments dropped by capacity in the timed steps (the
  model FLOPs above count every token as computed).

Examples (from the repository root)::

    python benchmarks/train_throughput.py --device cpu --preset tiny --steps 3 --warmup 1   # seconds, CPU
    python benchmarks/train_throughput.py --device cuda --precision bf16-mixed --preset base --steps 30
    python benchmarks/train_throughput.py --device cpu --preset small --threads 2 --batch-size 64 \
        --side-by-side 5 --steps 3 --warmup 40    # MoE fp32 / MoE bf16 / dense bf16, interleaved rounds
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import resource
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/running_order.py, beside this file
from running_order import add_round_warmup_argument, running_order  # noqa: E402

from lightning_moe.models import MoETransformer, TransformerConfig, get_preset  # noqa: E402
from lightning_moe.moe import MoE  # noqa: E402

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")
GiB = 2**30


# ------------------------------------------------------------------------------------------- model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options shared with ``model_scale.py``."""
    parser.add_argument("--preset", default="tiny", help="tiny | small | base (lightning_moe.models.PRESETS)")
    parser.add_argument("--experts", type=int, help="experts per MoE layer (default: the preset's)")
    parser.add_argument("--k", type=int, help="experts per token (default: the preset's)")
    parser.add_argument("--expert", choices=["ffn", "glu"], help="expert kind (default: the preset's)")
    parser.add_argument("--d-model", type=int, help="model width")
    parser.add_argument("--ffn", type=int, help="dense FFN and expert inner width")
    parser.add_argument("--heads", type=int, help="attention heads")
    parser.add_argument("--layers", type=int, help="encoder and decoder blocks (each)")
    parser.add_argument("--moe-every", type=int, help="every n-th block is an MoE block")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary size")
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--batch-size", type=int, default=16, help="sentence pairs per step")
    parser.add_argument("--src-len", type=int, default=64, help="source tokens per sentence")
    parser.add_argument("--tgt-len", type=int, default=64, help="target tokens per sentence")
    parser.add_argument(
        "--fp32-residual",
        action="store_true",
        help="under bf16-mixed keep the residual stream in fp32 (model.residual_in_compute_dtype=false)",
    )


def build_config(args: argparse.Namespace) -> TransformerConfig:
    """The preset with the command line's overrides (dropout off: it only adds noise to timings)."""
    overrides: dict[str, Any] = {
        "vocab_size": args.vocab,
        "dropout": 0.0,
        "capacity_factor": args.capacity_factor,
        "eval_capacity_factor": args.capacity_factor,
        "max_positions": max(args.src_len, args.tgt_len) + 1,
        "residual_in_compute_dtype": not args.fp32_residual,
    }
    names = {
        "experts": "num_experts",
        "k": "k",
        "expert": "expert",
        "d_model": "d_model",
        "ffn": "ffn_hidden_size",
        "heads": "num_heads",
        "moe_every": "moe_every",
    }
    for arg, field in names.items():
        if getattr(args, arg) is not None:
            overrides[field] = getattr(args, arg)
    if args.layers is not None:
        overrides["encoder_layers"] = overrides["decoder_layers"] = args.layers
    return get_preset(args.preset, **overrides)


def _side(name: str) -> str:
    """``"src"``, ``"tgt"`` or ``"none"``: which tokens run through the parameter ``name`` (look-ups: none)."""
    if name.startswith("encoder_"):
        return "none" if name.startswith("encoder_pos_embed") else "src"
    if name.startswith("decoder_"):
        if name.startswith("decoder_pos_embed"):
            return "none"
        if ".cross_attn.k_proj." in name or ".cross_attn.v_proj." in name:
            return "src"  # keys and values of the encoder memory
        return "tgt"
    return "none"


def parameter_counts(model: MoETransformer) -> dict[str, float]:
    """Total and active parameters, the latter split by the side whose tokens use them.

    Works on a model built on the meta device (only shapes are read).
    """
    config = model.config
    k = config.moe.k
    counts = {"total": 0.0, "experts": 0.0, "active_src": 0.0, "active_tgt": 0.0}
    for name, p in model.named_parameters():
        n = float(p.numel())
        counts["total"] += n
        fraction = 1.0
        if ".experts." in name:
            counts["experts"] += n
            fraction = k / p.shape[0]  # grouped expert weights are [E, ...]: E of this layer (PR-MoE: per layer)
        side = _side(name)
        if side != "none":
            counts[f"active_{side}"] += n * fraction
    # The output projection: the tied embedding matrix or `output_proj`, once per target token.
    head = model.src_embed.weight if model.output_proj is None else model.output_proj.weight
    counts["active_tgt"] += float(head.numel())
    counts["active"] = counts["active_src"] + counts["active_tgt"]
    return counts


def step_flops(model: MoETransformer, batch_size: int, src_len: int, tgt_len: int) -> dict[str, float]:
    """Model FLOPs (``6N`` rule, per side) and attention-score FLOPs of one training step (forward + backward)."""
    counts = parameter_counts(model)
    src_tokens, tgt_tokens = batch_size * src_len, batch_size * tgt_len
    model_flops = 6.0 * (counts["active_src"] * src_tokens + counts["active_tgt"] * tgt_tokens)
    d, cfg = model.config.d_model, model.config
    # QK^T and AV: 2 matmuls x 2 FLOPs per multiply-add, x3 for forward + backward.
    per_layer_enc = 2 * 2 * src_len * src_len * d
    per_layer_dec = 2 * 2 * (tgt_len * tgt_len + tgt_len * src_len) * d  # causal self (no saving taken) + cross
    attention = 3.0 * batch_size * (cfg.encoder_layers * per_layer_enc + cfg.decoder_layers * per_layer_dec)
    return {
        "model_flops": model_flops,
        "attention_flops": attention,
        "src_tokens": src_tokens,
        "tgt_tokens": tgt_tokens,
    }


def synthetic_batches(
    num: int, batch_size: int, src_len: int, tgt_len: int, vocab: int, device: torch.device, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``num`` batches of random ids 5..vocab-1 (no padding: every token counts), on ``device``."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num):
        src = torch.randint(5, vocab, (batch_size, src_len), generator=g)
        tgt = torch.randint(5, vocab, (batch_size, tgt_len + 1), generator=g)
        batches.append({"src": src.to(device), "tgt_in": tgt[:, :-1].to(device), "tgt_out": tgt[:, 1:].to(device)})
    return batches


def environment(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: versions, device name, threads."""
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / GiB, 1),
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
        )
    return env


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory (CUDA) or peak resident set size of the process (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux: KiB


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)`` with the current CUDA device's index filled in (``set_device`` needs one)."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------- benchmark

PEAK_SHAPE = (4096, 512, 2048)
"""``M, K, N`` of the matrix product whose rate is the CPU's measured peak (the shape of the expert benchmark)."""

CUDA_PEAK_TFLOPS = 989.0
"""Dense bf16 peak of an H100 SXM / H200, the reference on CUDA."""

PEAK_DTYPES = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16}
"""The dtype of a precision's matrix products (the peak its utilisation is taken against)."""


def measure_matmul_tflops(dtype: torch.dtype, repeats: int = 5, shape: tuple[int, int, int] = PEAK_SHAPE) -> float:
    """Best-of-``repeats`` rate of one ``[M, K] @ [K, N]`` product in ``dtype`` on the CPU with the current threads
    (TFLOP/s): what this machine's matrix units deliver to a large product (bf16 reaches AMX / AVX512-BF16
    through oneDNN where the CPU has them)."""
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: oneDNN's kernel selection, pages of out
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * m * k * n / best / 1e12


class Trainer:
    """One model with its optimizer and batches, ready to time (``args`` with ``precision`` and ``experts``)."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        torch.manual_seed(args.seed)
        self.args, self.device = args, device
        self.config = build_config(args)
        model = MoETransformer(self.config).to(device)
        if args.precision == "bf16-true":
            model = model.to(torch.bfloat16)
        model.train()
        self.model = model
        # Fused AdamW: one kernel over all parameters, on CPU as on CUDA (the per-tensor loop was ~10x slower).
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed" else nullcontext()
        )
        # The translator's own training loss (models/transformer.py: MoETransformer.loss), aux loss included
        self.loss = torch.compile(model.loss) if args.compile else model.loss
        self.batches = synthetic_batches(
            args.num_batches, args.batch_size, args.src_len, args.tgt_len, self.config.vocab_size, device, args.seed
        )
        self.moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
        self.flops = step_flops(model, args.batch_size, args.src_len, args.tgt_len)
        self.counts = parameter_counts(model)
        self.steps_done = 0

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            loss, _ = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def time_steps(self, steps: int) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
        """Seconds for ``steps`` steps (cycling through the batches), their losses and dropped fractions."""
        dropped: list[torch.Tensor] = []
        losses: list[torch.Tensor] = []
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            losses.append(self.step(self.batches[self.steps_done % len(self.batches)]))
            self.steps_done += 1
            dropped.extend(m.last_stats.dropped_fraction for m in self.moe_layers if m.last_stats is not None)
        synchronize(self.device)
        return time.perf_counter() - start, losses, dropped


def peaks(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Peak TFLOP/s to take utilisation against: ``--peak-tflops``, else 989 on CUDA, else measured here."""
    if args.peak_tflops is not None:
        return {"peak_tflops": args.peak_tflops, "peak_kind": "given"}
    if device.type == "cuda":
        return {"peak_tflops": CUDA_PEAK_TFLOPS, "peak_kind": "H100/H200 dense bf16"}
    fp32, bf16 = measure_matmul_tflops(torch.float32), measure_matmul_tflops(torch.bfloat16)
    peak = bf16 if PEAK_DTYPES[args.precision] == torch.bfloat16 else fp32
    return {
        "peak_tflops": peak,
        "peak_kind": "measured mm " + "x".join(map(str, PEAK_SHAPE)),
        "measured_fp32_tflops": fp32,
        "measured_bf16_tflops": bf16,
    }


def _best_peaks(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The higher of two measurements of :func:`peaks` (a busy machine only ever lowers a measured rate)."""
    best = {**a}
    for key in ("peak_tflops", "measured_fp32_tflops", "measured_bf16_tflops"):
        best[key] = max(a[key], b[key])
    return best


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm up, time; returns the result record."""
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    peak = peaks(args, device)
    trainer = Trainer(args, device)
    warmup_s, _, _ = trainer.time_steps(args.warmup)
    elapsed, losses, dropped = trainer.time_steps(args.steps)
    if "measured_bf16_tflops" in peak:  # measured again after the steps (the first product of an idle CPU is slow)
        peak = _best_peaks(peak, peaks(args, device))

    profiled: dict[str, float] = {}
    if args.profile:
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/profiling.py
        from profiling import profile_steps

        profiled = profile_steps(lambda: trainer.step(trainer.batches[0]), args.profile, device)

    flops, counts = trainer.flops, trainer.counts
    step_s = elapsed / max(args.steps, 1)
    tokens = flops["src_tokens"] + flops["tgt_tokens"]
    model_tflops = flops["model_flops"] / step_s / 1e12
    final_loss = float(losses[-1]) if losses else math.nan
    record = {
        "benchmark": "train_throughput",
        "label": args.label,
        "config": {**{k: v for k, v in vars(args).items() if k not in ("json",)}, "model": asdict(trainer.config)},
        "environment": environment(device),
        "params_total": int(counts["total"]),
        "params_experts": int(counts["experts"]),
        "params_active": int(counts["active"]),
        "tokens_per_step": int(tokens),
        "warmup_s": warmup_s,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "target_tokens_per_s": flops["tgt_tokens"] / step_s,
        "model_tflops_per_step": flops["model_flops"] / 1e12,
        "model_tflops_per_s": model_tflops,
        "attention_tflops_per_s": flops["attention_flops"] / step_s / 1e12,
        **peak,
        "mfu": model_tflops / peak["peak_tflops"],
        "peak_memory_gib": peak_memory_gib(device),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "dropped_fraction": float(torch.stack(dropped).float().mean()) if dropped else 0.0,
        "final_loss": final_loss,
        "loss_finite": math.isfinite(final_loss),
        **profiled,
    }
    return record


SIDE_BY_SIDE = (("32-true", None), ("bf16-mixed", None), ("bf16-mixed", 0))
"""``(precision, experts)`` of the side-by-side variants: the MoE model in fp32 and bf16, the dense twin in bf16."""


def variant_name(precision: str, experts: int | None) -> str:
    return ("dense " if experts == 0 else "MoE ") + precision


class _VariantHere:
    """A side-by-side variant trained in this process (``--one-process``)."""

    def __init__(self, variant: argparse.Namespace, device: torch.device) -> None:
        self.trainer = Trainer(variant, device)
        self.info = _variant_info(self.trainer)

    def steps(self, untimed: int, timed: int) -> tuple[float, list[float]]:
        """``untimed`` steps, then ``timed`` steps: their seconds and dropped fractions."""
        self.trainer.time_steps(untimed)
        elapsed, _, dropped = self.trainer.time_steps(timed)
        return elapsed, [float(d) for d in dropped]

    def close(self) -> None:
        pass


class _VariantProcess:
    """A side-by-side variant trained in a process of its own, which waits (no CPU) between its turns.

    A training run holds one model per process; in a shared process each variant's step would also pay for, or
    profit from, the heap the other variants left (figures: README, issue 15).
    """

    def __init__(self, variant: argparse.Namespace, device: torch.device) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no heap or thread pool inherited
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_serve_variant, args=(child_conn, variant, str(device)), daemon=True)
        self._process.start()
        child_conn.close()
        self.info = self._receive()

    def _receive(self) -> Any:
        try:
            reply = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"variant process exited with code {self._process.exitcode}") from None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def steps(self, untimed: int, timed: int) -> tuple[float, list[float]]:
        self._conn.send((untimed, timed))
        return self._receive()

    def close(self) -> None:
        try:
            self._conn.send(None)
        except OSError:  # the process has ended already (after an error, which the caller is raising)
            pass
        self._process.join(timeout=60)


def _variant_info(trainer: Trainer) -> dict[str, Any]:
    return {"flops": trainer.flops, "experts": trainer.config.moe.num_experts, "precision": trainer.args.precision}


def _serve_variant(conn: Any, variant: argparse.Namespace, device_name: str) -> None:
    """Body of a :class:`_VariantProcess`: build the trainer, then run the steps asked for until told to stop."""
    try:
        if variant.retain_freed_memory:
            from host_memory import retain_freed_host_memory  # benchmarks/, on sys.path above

            retain_freed_host_memory()
        if variant.threads:
            torch.set_num_threads(variant.threads)
        here = _VariantHere(variant, torch.device(device_name))
        conn.send(here.info)
        while (request := conn.recv()) is not None:
            conn.send(here.steps(*request))
    except Exception as error:  # handed to the parent, which raises it
        conn.send(error)


def side_by_side(args: argparse.Namespace) -> dict[str, Any]:
    """``--side-by-side R``: the variants of :data:`SIDE_BY_SIDE` built once (each in a process of its own unless
    ``--one-process``), warmed up one after the other, then ``R`` rounds that
    each time ``--steps`` steps of every variant, in a balanced order that changes every round (so that load from
    elsewhere hits all alike, and no variant always follows the same one; each after
    ``--round-warmup`` untimed steps, since the first step after a switch pays for the other variant's
    memory traffic, which steady training does not) and, on
    CPU, measure the matrix-product peak again (the best measurement counts); the median and the best round
    per variant, and the ratios the bf16 goals are stated in."""
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = peaks(args, device)
    runners: dict[str, _VariantHere | _VariantProcess] = {}
    # with --compile, the eager variants stay eager and a compiled MoE bf16-mixed variant joins them
    variants_built = [(p, e, False) for p, e in SIDE_BY_SIDE] + ([("bf16-mixed", None, True)] if args.compile else [])
    runner_class = _VariantHere if args.one_process else _VariantProcess
    try:
        for precision, experts, compiled in variants_built:
            variant = argparse.Namespace(
                **{
                    **vars(args),
                    "precision": precision,
                    "experts": experts if experts is not None else args.experts,
                    "compile": compiled,
                }
            )
            name = variant_name(precision, experts) + (" compiled" if compiled else "")
            runners[name] = runner = runner_class(variant, device)
            runner.steps(args.warmup, 0)
        rounds: dict[str, list[float]] = {name: [] for name in runners}
        dropped: dict[str, list[float]] = {name: [] for name in runners}
        for round_index in range(args.side_by_side):
            for name in running_order(list(runners), round_index):
                elapsed, round_dropped = runners[name].steps(args.round_warmup, args.steps)
                rounds[name].append(elapsed / max(args.steps, 1))
                dropped[name].extend(round_dropped)
            if "measured_bf16_tflops" in peak:  # the peak is measured again every round: the best is the machine's
                peak = _best_peaks(peak, peaks(args, device))
    finally:
        for runner in runners.values():
            runner.close()
    variants = {}
    for name, runner in runners.items():
        times = sorted(rounds[name])
        flops = runner.info["flops"]
        tokens = flops["src_tokens"] + flops["tgt_tokens"]
        median_s, best_s = statistics.median(times), times[0]
        bf16_peak = peak.get("measured_bf16_tflops", peak["peak_tflops"])
        variants[name] = {
            "precision": runner.info["precision"],
            "experts": runner.info["experts"],
            "step_s": rounds[name],
            "tokens_per_s_median": tokens / median_s,
            "tokens_per_s_best": tokens / best_s,
            "model_tflops_per_s_median": flops["model_flops"] / median_s / 1e12,
            "utilisation_of_bf16_peak_median": flops["model_flops"] / median_s / 1e12 / bf16_peak,
            # the model FLOPs count dropped tokens as computed: a fresh router drops more (see --warmup)
            "dropped_fraction": statistics.fmean(dropped[name]) if dropped[name] else 0.0,
        }
    moe_fp32, moe_bf16, dense_bf16 = (variants[variant_name(p, e)] for p, e in SIDE_BY_SIDE)
    ratios = {
        f"bf16_over_fp32_{stat}": moe_bf16[f"tokens_per_s_{stat}"] / moe_fp32[f"tokens_per_s_{stat}"]
        for stat in ("median", "best")
    } | {
        f"moe_over_dense_bf16_{stat}": moe_bf16[f"tokens_per_s_{stat}"] / dense_bf16[f"tokens_per_s_{stat}"]
        for stat in ("median", "best")
    }
    compiled = variants.get(variant_name("bf16-mixed", None) + " compiled")
    if compiled:
        for stat in ("median", "best"):
            ratios[f"compiled_over_eager_bf16_{stat}"] = (
                compiled[f"tokens_per_s_{stat}"] / moe_bf16[f"tokens_per_s_{stat}"]
            )
            ratios[f"compiled_bf16_over_fp32_{stat}"] = (
                compiled[f"tokens_per_s_{stat}"] / moe_fp32[f"tokens_per_s_{stat}"]
            )
    return {
        "benchmark": "train_throughput_side_by_side",
        "label": args.label,
        "rounds": args.side_by_side,
        "isolation": "one process" if args.one_process else "a process per variant",
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "environment": environment(device),
        **peak,
        "variants": variants,
        "ratios": ratios,
    }


def print_side_by_side(result: dict[str, Any]) -> None:
    env = result["environment"]
    peak_note = (
        f"measured peak fp32 {result['measured_fp32_tflops']:.3f} / bf16 {result['measured_bf16_tflops']:.3f} TFLOP/s"
        if "measured_bf16_tflops" in result
        else f"peak {result['peak_tflops']:g} TFLOP/s"
    )
    print(
        f"# torch {env['torch']} on {env.get('gpu', env['device'])}, {env['threads']} threads, "
        f"{result['rounds']} interleaved rounds, {result.get('isolation', 'one process')}; {peak_note}"
        + ("; malloc retains freed memory" if result["config"].get("retain_freed_memory") else "")
    )
    print(
        f"{'variant':<24} {'tokens/s median':>16} {'tokens/s best':>14} {'TFLOP/s':>8} {'of bf16 peak':>13} "
        f"{'dropped':>8}"
    )
    for name, v in result["variants"].items():
        print(
            f"{name:<24} {v['tokens_per_s_median']:>16,.0f} {v['tokens_per_s_best']:>14,.0f} "
            f"{v['model_tflops_per_s_median']:>8.3f} {v['utilisation_of_bf16_peak_median'] * 100:>12.1f}% "
            f"{v.get('dropped_fraction', 0.0):>8.3f}"
        )
    r = result["ratios"]
    print(
        f"bf16 / fp32 (MoE): median {r['bf16_over_fp32_median']:.2f}x, best {r['bf16_over_fp32_best']:.2f}x | "
        f"MoE / dense (bf16): median {r['moe_over_dense_bf16_median']:.2f}x, best {r['moe_over_dense_bf16_best']:.2f}x"
    )
    if "compiled_over_eager_bf16_median" in r:
        print(
            f"compiled / eager (MoE bf16): median {r['compiled_over_eager_bf16_median']:.2f}x, best "
            f"{r['compiled_over_eager_bf16_best']:.2f}x | compiled bf16 / fp32: median "
            f"{r['compiled_bf16_over_fp32_median']:.2f}x, best {r['compiled_bf16_over_fp32_best']:.2f}x"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=PRECISIONS, help="default: bf16-mixed on CUDA, 32-true on CPU")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (per round with --side-by-side)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="untimed steps first; a fresh router drops 15%% of the tokens and learns balance over some 30 steps",
    )
    parser.add_argument("--num-batches", type=int, default=4, help="distinct batches cycled through")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak for MFU in TFLOP/s (default: 989 on CUDA; on CPU the measured matrix-product "
        "rate in the precision's dtype)",
    )
    parser.add_argument(
        "--side-by-side",
        type=int,
        default=0,
        metavar="R",
        help="R interleaved rounds of MoE 32-true, MoE bf16-mixed and the dense twin in bf16-mixed",
    )
    add_round_warmup_argument(parser)  # with --side-by-side
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="with --side-by-side: train every variant in this process (default: each in a process of its own, as "
        "in training; in one process each step also meets the heap the other variants left)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (with --side-by-side: add a compiled MoE bf16-mixed variant to the eager ones)",
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="after timing, profile N steps (table)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="", help="a name for this run in the JSON")
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="CPU: glibc malloc keeps freed memory for reuse, as a caching allocator does (benchmarks/host_memory.py)",
    )
    parser.add_argument("--json", type=Path, help="write the result record to this file")
    args = parser.parse_args(argv)
    if args.retain_freed_memory:
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/host_memory.py
        from host_memory import retain_freed_host_memory

        if not retain_freed_host_memory():
            raise SystemExit("--retain-freed-memory needs glibc's malloc (Linux)")
    if args.precision is None:
        args.precision = "bf16-mixed" if args.device.startswith("cuda") else "32-true"
    if args.side_by_side:
        result = side_by_side(args)
        print_side_by_side(result)
    else:
        result = run(args)
        env = result["environment"]
        print(
            f"# torch {env['torch']} on {env.get('gpu', env['device'])}, {args.precision}, preset {args.preset}, "
            f"E={result['config']['model']['moe']['num_experts']} k={result['config']['model']['moe']['k']}, "
            f"{result['params_total'] / 1e6:.1f}M params ({result['params_active'] / 1e6:.1f}M active)"
        )
        print(
            f"step {result['step_s'] * 1e3:.1f} ms | {result['tokens_per_s']:,.0f} tokens/s | "
            f"{result['model_tflops_per_s']:.2f} model TFLOP/s | MFU {result['mfu'] * 100:.2f}% of "
            f"{result['peak_tflops']:.3g} TFLOP/s ({result['peak_kind']}) | "
            f"peak {result['peak_memory_gib']:.2f} GiB ({result['peak_memory_kind']}) | dropped {result['dropped_fraction']:.3f} | "
            f"loss {result['final_loss']:.3f}"
        )
    write_record(args.json, result)
    return result


def record_header(benchmark: str, args: argparse.Namespace) -> dict[str, Any]:
    """The fields a CPU benchmark's result record starts with: its name, its options (less ``--json``), the torch
    version and the intra-op thread count."""
    return {
        "benchmark": benchmark,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def write_table_record(benchmark: str, args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The record of a benchmark that prints a table (:func:`record_header` and its ``rows``), written to
    ``args.json`` when given; returned."""
    record = {**record_header(benchmark, args), "rows": rows}
    write_record(args.json, record)
    return record


def step_summary(step_s: dict[str, list[float]]) -> dict[str, float]:
    """``"<name> step_ms_median"`` and ``"<name> step_ms_best"`` of each contender's timed steps (seconds)."""
    summary = {f"{name} step_ms_median": statistics.median(s) * 1e3 for name, s in step_s.items()}
    return summary | {f"{name} step_ms_best": min(s) * 1e3 for name, s in step_s.items()}


def write_record(path: Path | None, record: dict[str, Any]) -> None:
    """Write a benchmark's result record as JSON to ``path`` (folders made as needed); nothing when None."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
