"""The translator's training step against its own matrix products: how much of the step they are, and the MFU
ceiling they set.

``train_throughput.py`` reports the step's model FLOP rate against the machine's peak product rate (one large
``4096x512 @ 512x2048``). The step's products are smaller and laid out as autograd leaves them (weight gradients
read a transposed operand), so they run slower than the peak; and everything else in the step (norms,
activations, softmax, the loss, casts, routing, the optimizer) adds time without model FLOPs. This benchmark
separates the two. It records every matrix product of one training step (``mm``, ``addmm``, ``bmm``, their
``out=`` forms; shapes, strides and dtypes as they ran, through a ``TorchDispatchMode``) and times each one where
it runs, then replays each distinct product alone on fresh operands with the same shapes and strides (warm,
median of ``--repeats``). Printed:

* the step (median of ``--steps`` steps without recording) and its MFU against the measured bf16 peak;
* the products' share of the step, their rate inside the step and alone;
* two ceilings of the MFU: if the step did nothing but its products, at the rate they run inside the step, and
  at the rate they run alone. A step can reach the first only by removing all other work; the second also
  needs its products to run as they do with warm caches;
* the product groups that take the most time.

Products that worker threads run (experts spread over threads, ``moe/kernels/expert_threads.py``) are not seen by
the recording; ``coverage`` (the recorded products' FLOPs over the step's model FLOPs plus attention) says how
much was seen. The model FLOPs count ``6 x active parameters`` per token (``train_throughput.py``); attention
scores are extra products, so the ceilings are conservative.

    python benchmarks/step_products.py --preset small --threads 2 --batch-size 64 --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_memory import retain_freed_host_memory  # noqa: E402  (benchmarks/, beside this file)
from train_throughput import Trainer, add_model_arguments, measure_matmul_tflops, record_header, write_record  # noqa: E402

PRODUCTS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.mm.out,
    torch.ops.aten.addmm.default,
    torch.ops.aten.addmm.out,
    torch.ops.aten.bmm.default,
    torch.ops.aten.bmm.out,
}
"""The matrix products recorded (what ``nn.Linear``, ``torch.matmul`` and the expert kernels reach on CPU)."""

TensorSpec = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]
"""Shape, strides and dtype of one operand."""


def product_flops(op: torch._ops.OpOverload, specs: list[TensorSpec]) -> float:
    """``2 m k n`` (times the batch for ``bmm``) of one product from its operands' shapes."""
    name = op.overloadpacket.__name__
    (a_shape, _, _), (b_shape, _, _) = (specs[1], specs[2]) if name == "addmm" else (specs[0], specs[1])
    if name == "bmm":
        return 2.0 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    return 2.0 * a_shape[0] * a_shape[1] * b_shape[1]


class ProductRecorder(TorchDispatchMode):
    """Times every matrix product dispatched while active; everything else passes through untimed."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[tuple, float] = defaultdict(float)
        self.calls: dict[tuple, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        kwargs = kwargs or {}
        if func not in PRODUCTS:
            return func(*args, **kwargs)
        specs = [(tuple(t.shape), tuple(t.stride()), t.dtype) for t in args if isinstance(t, torch.Tensor)]
        out = kwargs.get("out")
        key = (func, tuple(specs), None if out is None else (tuple(out.shape), tuple(out.stride()), out.dtype))
        start = time.perf_counter()
        result = func(*args, **kwargs)
        self.seconds[key] += time.perf_counter() - start
        self.calls[key] += 1
        return result


def _operand(spec: TensorSpec) -> torch.Tensor:
    shape, stride, dtype = spec
    return torch.empty_strided(shape, stride, dtype=dtype).normal_()


def replay_seconds(key: tuple, repeats: int) -> float:
    """Median time of one product like ``key``'s, alone, on fresh operands with its shapes and strides (warm)."""
    func, specs, out_spec = key
    operands = [_operand(spec) for spec in specs]
    kwargs = {} if out_spec is None else {"out": _operand(out_spec)}
    func(*operands, **kwargs)  # oneDNN builds its kernel for the shape; the output's pages are touched
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func(*operands, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _describe(key: tuple) -> str:
    func, specs, _ = key
    operands = specs[1:] if func.overloadpacket.__name__ == "addmm" else specs
    parts = []
    for shape, stride, _ in operands:
        transposed = len(shape) >= 2 and stride[-2] == 1 and stride[-1] != 1
        parts.append("x".join(map(str, shape)) + ("(T)" if transposed else ""))
    return f"{func.overloadpacket.__name__} " + " @ ".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--precision", default="bf16-mixed", choices=["32-true", "bf16-mixed", "bf16-true"])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (without recording)")
    parser.add_argument("--recorded-steps", type=int, default=2, help="steps whose products are recorded")
    parser.add_argument("--repeats", type=int, default=9, help="timings of each distinct product alone")
    parser.add_argument("--top", type=int, default=10, help="product groups listed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retain-freed-memory", action="store_true", help="glibc malloc keeps freed memory")
    parser.add_argument("--json", type=Path, help="write the result record to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.retain_freed_memory and not retain_freed_host_memory():
        raise SystemExit("--retain-freed-memory needs glibc's malloc (Linux)")
    variant = argparse.Namespace(**{**vars(args), "compile": False, "num_batches": 4, "lr": 1e-4})
    trainer = Trainer(variant, torch.device("cpu"))
    trainer.time_steps(args.warmup)
    step_times = [trainer.time_steps(1)[0] for _ in range(args.steps)]
    recorder = ProductRecorder()
    with recorder:
        trainer.time_steps(args.recorded_steps)
    # The peak of the dtype the step's products run in, measured twice (an idle CPU's first products are slow)
    peak_dtype = torch.float32 if args.precision == "32-true" else torch.bfloat16
    peak = max(measure_matmul_tflops(peak_dtype) for _ in range(2))

    per_step = 1.0 / args.recorded_steps
    rows = []
    for key, seconds in recorder.seconds.items():
        calls = recorder.calls[key] * per_step
        alone = replay_seconds(key, args.repeats) * calls
        flops = product_flops(key[0], list(key[1])) * calls
        rows.append(
            {
                "product": _describe(key),
                "calls": calls,
                "in_step_s": seconds * per_step,
                "alone_s": alone,
                "flops": flops,
            }
        )
    rows.sort(key=lambda r: -r["in_step_s"])
    step_s = statistics.median(step_times)
    model_flops = trainer.flops["model_flops"]
    in_step_s = sum(r["in_step_s"] for r in rows)
    alone_s = sum(r["alone_s"] for r in rows)
    product_flops_total = sum(r["flops"] for r in rows)
    result: dict[str, Any] = {
        **record_header("step_products", args),
        "step_ms": step_s * 1e3,
        "peak_tflops": peak,
        "model_tflops_per_step": model_flops / 1e12,
        "mfu": model_flops / step_s / 1e12 / peak,
        "products_tflops_per_step": product_flops_total / 1e12,
        "coverage": product_flops_total / (model_flops + trainer.flops["attention_flops"]),
        "products_in_step_ms": in_step_s * 1e3,
        "products_alone_ms": alone_s * 1e3,
        "products_share_of_step": in_step_s / step_s,
        "mfu_ceiling_in_step_rates": model_flops / in_step_s / 1e12 / peak,
        "mfu_ceiling_alone_rates": model_flops / alone_s / 1e12 / peak,
        "rows": rows,
    }
    r = result
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, experts "
        f"{trainer.config.moe.num_experts}, {args.precision}, batch {args.batch_size}; peak {peak:.2f} TFLOP/s "
        f"(measured mm 4096x512x2048)" + ("; malloc retains freed memory" if args.retain_freed_memory else "")
    )
    print(f"step {r['step_ms']:.1f} ms (median of {args.steps}), MFU {r['mfu']:.1%}")
    print(
        f"products: {sum(x['calls'] for x in rows):.0f} a step, {r['products_tflops_per_step'] * 1e3:.1f} GFLOP "
        f"(coverage {r['coverage']:.2f} of model + attention FLOPs); {r['products_in_step_ms']:.1f} ms in the step "
        f"({r['products_share_of_step']:.0%} of it, {product_flops_total / in_step_s / 1e12:.2f} TFLOP/s), "
        f"{r['products_alone_ms']:.1f} ms alone ({product_flops_total / alone_s / 1e12:.2f} TFLOP/s)"
    )
    print(
        f"MFU ceiling if the step were only its products: {r['mfu_ceiling_in_step_rates']:.1%} at their rates in "
        f"the step, {r['mfu_ceiling_alone_rates']:.1%} at their rates alone"
    )
    print(f"{'product':60s} {'calls':>6} {'in step ms':>10} {'alone ms':>9} {'TF/s step':>9} {'TF/s alone':>10}")
    for row in rows[: args.top]:
        print(
            f"{row['product'][:60]:60s} {row['calls']:6.1f} {row['in_step_s'] * 1e3:10.2f} {row['alone_s'] * 1e3:9.2f} "
            f"{row['flops'] / row['in_step_s'] / 1e12:9.2f} {row['flops'] / row['alone_s'] / 1e12:10.2f}"
        )
    write_record(args.json, result)
    return result


if __name__ == "__main__":
    main()
