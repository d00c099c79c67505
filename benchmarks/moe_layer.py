"""MoE layer speed and memory against a dense FFN doing the same useful FLOPs, measured side by side.

For each (E, k): forward+backward time of ``lightning_moe.MoE`` (T tokens, capacity factor 1.25) and
of one dense FFN ``d -> h -> d`` run on ``T*k`` tokens (the same useful FLOPs), alternating the two,
so machine noise hits both alike. Efficiency = dense time / MoE time (1.0 = no MoE overhead), the median
of the per-round ratios (robust to the machine slowing down mid-run). A round times one step of every
contender, in an order that changes every round so that each contender follows every other one equally often,
each timed step right after ``--round-warmup`` untimed ones of its own: the first step after another
contender pays for that one's freed memory and cold caches, and a fixed order would charge it to the same
contender every round.
Optional peers (``--peers``) implement other libraries' *techniques* in a few lines, for context:
``per_expert_loop`` (Switch-style: a mask and an ``nn.Linear`` pair per expert) and ``onehot_einsum``
(GShard-style: one-hot ``[T, E, C]`` dispatch and combine einsums over capacity buffers).

Peak memory is the allocator's peak during forward+backward above what was allocated before it
(read from the profiler's allocation events), plus the gradient memory the experts kept from the
previous step (``GradientMemory``), minus the bytes of the parameter gradients: what is left is
activations and workspace. Gradients are as large as the parameters (E times the dense FFN's for E
experts) and are reported by the strategy's memory benchmark instead.

``--ceiling`` adds what the machine allows: ``gemm ceil`` = time of the six FFN matrix products at T*k
rows with one weight / time of the same products over E groups of T*k/E rows with E weights, spread
over threads by expert and run by rows or by columns exactly when the layer does (the efficiency an MoE
layer would reach if only its expert GEMMs cost anything), ``+gate ceil`` = the same with the gate's three fp32 products (T x d by
d x E: logits, input and weight gradients) added to the grouped time, since the layer routes in fp32 whatever
the compute dtype and the dense FFN has no gate, and ``grad fault ms`` = the extra time of writing the experts'
weight gradients into fresh memory rather than reused memory: what a layer that frees its ``[E, d, h]``
gradients between steps pays (glibc returns blocks over 32 MiB to the OS, and the next step's page
faults cost this much). The layer avoids it by keeping that memory (``GradientMemory``); a per-expert
``nn.Linear`` peer's 4 MiB gradients are recycled inside malloc instead.

    python benchmarks/moe_layer.py --peers --ceiling --repeats 7    # the README table (CPU, fp32, 2 threads)
    python benchmarks/moe_layer.py --peers --retain-freed-memory --no-memory --repeats 7   # caching malloc
    python benchmarks/moe_layer.py --device cuda --dtype bf16 --large   # the GPU check
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from host_memory import retain_freed_host_memory  # noqa: E402  (benchmarks/host_memory.py, beside this file)
from profiling import profile_steps  # noqa: E402  (benchmarks/profiling.py, beside this file)
from running_order import add_round_warmup_argument, running_order  # noqa: E402  (benchmarks/running_order.py, beside this file)

from lightning_moe.moe import MoE  # noqa: E402
from lightning_moe.moe.kernels.expert_threads import run_over_experts  # noqa: E402
from lightning_moe.moe.kernels.gradient_memory import gradient_memory_of  # noqa: E402
from lightning_moe.moe.kernels.product_layout import backward_by_columns, whole_experts_per_thread  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class DenseFFN(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PerExpertLoopMoE(nn.Module):
    """Switch-style peer: top-k, capacity, then a Python loop over experts with boolean masks."""

    def __init__(self, d: int, h: int, num_experts: int, k: int, capacity_factor: float) -> None:
        super().__init__()
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(DenseFFN(d, h) for _ in range(num_experts))
        self.k, self.capacity_factor = k, capacity_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x).float(), -1)
        weight, index = probs.topk(self.k, -1)  # [T, k]
        capacity = math.ceil(self.k * x.shape[0] * self.capacity_factor / len(self.experts))
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (index == e).nonzero(as_tuple=True)
            token, slot = token[:capacity], slot[:capacity]
            if token.numel():
                out = out.index_add(0, token, expert(x[token]) * weight[token, slot].unsqueeze(-1).to(x.dtype))
        return out


class OneHotEinsumMoE(nn.Module):
    """GShard-style peer: one-hot dispatch/combine tensors [T, E, C] and batched experts on capacity buffers."""

    def __init__(self, d: int, h: int, num_experts: int, k: int, capacity_factor: float) -> None:
        super().__init__()
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, d, h) * d**-0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, h, d) * h**-0.5)
        self.k, self.capacity_factor, self.num_experts = k, capacity_factor, num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_tokens, num_experts = x.shape[0], self.num_experts
        capacity = math.ceil(self.k * num_tokens * self.capacity_factor / num_experts)
        probs = torch.softmax(self.gate(x).float(), -1)
        weight, index = probs.topk(self.k, -1)  # [T, k]
        combine = x.new_zeros(num_tokens, num_experts, capacity, dtype=torch.float32)
        filled = torch.zeros(num_experts, dtype=torch.long, device=x.device)
        for j in range(self.k):
            mask = F.one_hot(index[:, j], num_experts)  # [T, E]
            position = torch.cumsum(mask, 0) - 1 + filled  # [T, E]
            filled = filled + mask.sum(0)
            keep = mask * (position < capacity)
            slot = F.one_hot(position.clamp(0, capacity - 1), capacity)  # [T, E, C]
            combine = combine + (weight[:, j, None, None] * keep.unsqueeze(-1) * slot)
        dispatch = (combine > 0).to(x.dtype)
        buffers = torch.einsum("tec,td->ecd", dispatch, x)  # [E, C, d]
        hidden = F.gelu(torch.bmm(buffers, self.w1))
        expert_out = torch.bmm(hidden, self.w2)  # [E, C, d]
        return torch.einsum("tec,ecd->td", combine.to(x.dtype), expert_out)


def step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    out = module(x)
    if isinstance(out, tuple):
        out = out[0] + 0.0 * out[1]
    out.backward(grad)


def timed(fn: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory_bytes(fn: Callable[[], None], device: str) -> int:
    """Peak allocated bytes during ``fn`` above the bytes allocated when it starts."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each op's own allocations minus frees, in start order: an op-granular allocation timeline.
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def ffn_gemms(rows: int, num_experts: int, d: int, h: int, device: str, dtype: torch.dtype) -> Callable[[], None]:
    """The six matrix products of a d -> h -> d FFN's forward+backward (two forward, two input gradients, two
    weight gradients) over ``num_experts`` groups of ``rows`` rows, each group with its own weights, every
    output written into a buffer allocated once (no allocation or page-fault cost). The backward products run
    the way round the layer runs them (by rows, or by columns where ``backward_by_columns`` says so), on
    operands already laid out for it: the transposed copies the layer makes are not products."""
    n = rows * num_experts
    w1 = torch.randn(num_experts, d, h, device=device, dtype=dtype)
    w2 = torch.randn(num_experts, h, d, device=device, dtype=dtype)
    x, a, g, gp = (torch.randn(n, c, device=device, dtype=dtype) for c in (d, h, d, h))
    out_h, out_d = torch.empty(n, h, device=device, dtype=dtype), torch.empty(n, d, device=device, dtype=dtype)
    grad_w1, grad_w2 = torch.empty_like(w1), torch.empty_like(w2)
    by_columns = backward_by_columns(rows, d, h, w1)
    if by_columns:  # the rows of each group transposed, [E, width, rows]
        x_t, a_t, gp_t = (t.view(num_experts, rows, -1).transpose(1, 2).contiguous() for t in (x, a, gp))
        out_h_t, out_d_t = torch.empty_like(a_t), torch.empty_like(x_t)

    def products(first: int, last: int, scratch: None) -> None:
        for e in range(first, last):
            r = slice(e * rows, (e + 1) * rows)
            torch.mm(x[r], w1[e], out=out_h[r])  # forward fc1
            torch.mm(a[r], w2[e], out=out_d[r])  # forward fc2
            if by_columns:
                torch.mm(w2[e], g[r].t(), out=out_h_t[e])  # input gradient of fc2, transposed
                torch.mm(w1[e], gp_t[e], out=out_d_t[e])  # input gradient of fc1, transposed
                torch.mm(a_t[e], g[r], out=grad_w2[e])  # weight gradient of fc2
                torch.mm(x_t[e], gp_t[e].t(), out=grad_w1[e])  # weight gradient of fc1
                continue
            torch.mm(g[r], w2[e].t(), out=out_h[r])  # input gradient of fc2
            torch.mm(gp[r], w1[e].t(), out=out_d[r])  # input gradient of fc1
            torch.mm(a[r].t(), g[r], out=grad_w2[e])  # weight gradient of fc2
            torch.mm(x[r].t(), gp[r], out=grad_w1[e])  # weight gradient of fc1

    bounds = [e * rows for e in range(num_experts + 1)]
    # Spread over threads by expert exactly when the layer's loop path would be.
    return lambda: run_over_experts(products, bounds, d * h, any_rows=whole_experts_per_thread(d, h, w1))


def router_gemms(tokens: int, num_experts: int, d: int, device: str, dtype: torch.dtype) -> Callable[[], None]:
    """The gate's three products (logits, input gradient, weight gradient) in ``dtype`` (fp32 with fp32 gating,
    the layer's default, whatever the compute dtype): a cost the equal-FLOP dense FFN does not have."""
    shapes = ((tokens, d), (num_experts, d), (tokens, num_experts))
    x, w, g = (torch.randn(*shape, device=device, dtype=dtype) for shape in shapes)
    logits, grad_x, grad_w = torch.empty_like(g), torch.empty_like(x), torch.empty_like(w)

    def products() -> None:
        torch.mm(x, w.t(), out=logits)
        torch.mm(g, w, out=grad_x)
        torch.mm(g.t(), x, out=grad_w)

    return products


def gemm_ceilings(
    rows: int, num_experts: int, d: int, h: int, device: str, dtype: torch.dtype, gate_dtype: torch.dtype, repeats: int
) -> tuple[float, float]:
    """``(experts only, experts and fp32 gate)``: time of the FFN products at ``rows * num_experts`` rows with
    one weight / time of the same products over ``num_experts`` groups of ``rows`` rows with their own weights
    (plus, for the second, the gate's products over the ``rows * num_experts`` tokens); alternating, median of
    the per-round ratios."""
    grouped = ffn_gemms(rows, num_experts, d, h, device, dtype)
    large = ffn_gemms(rows * num_experts, 1, d, h, device, dtype)
    gate = router_gemms(rows * num_experts, num_experts, d, device, gate_dtype)
    grouped(), large(), gate()
    experts_only, with_gate = [], []
    for _ in range(repeats):
        large_s, grouped_s, gate_s = timed(large, device), timed(grouped, device), timed(gate, device)
        experts_only.append(large_s / grouped_s)
        with_gate.append(large_s / (grouped_s + gate_s))
    return statistics.median(experts_only), statistics.median(with_gate)


def gradient_first_touch_seconds(
    num_experts: int, d: int, h: int, device: str, dtype: torch.dtype, repeats: int
) -> float:
    """Extra time of writing the experts' weight gradients (``2 E d h`` elements) into freshly allocated memory
    rather than into memory already in use: with gradients set to None between steps, the allocator returns
    large blocks to the OS and the next step pays the page faults (zero on GPUs, whose allocator caches)."""
    if device != "cpu":
        return 0.0
    reused = torch.empty(2 * num_experts, d, h, dtype=dtype)

    def fresh() -> None:
        for _ in range(2):
            torch.empty(num_experts, d, h, dtype=dtype).fill_(1.0)

    fresh_s = statistics.median(timed(fresh, device) for _ in range(repeats))
    reused_s = statistics.median(timed(lambda: reused.fill_(1.0), device) for _ in range(repeats))
    return max(fresh_s - reused_s, 0.0)


def measure(num_experts: int, k: int, args: argparse.Namespace, tokens: int, d: int, h: int) -> dict[str, float]:
    device, dtype = args.device, DTYPES[args.dtype]
    torch.manual_seed(0)
    contenders: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    moe = MoE(
        d,
        num_experts,
        h,
        k=k,
        capacity_factor=args.capacity_factor,
        eval_capacity_factor=args.capacity_factor,
        fp32_gating=not args.no_fp32_gating,
    )
    contenders["moe"] = (moe.to(device, dtype), x)
    x_dense = torch.randn(tokens * k, d, device=device, dtype=dtype, requires_grad=True)
    contenders["dense"] = (DenseFFN(d, h).to(device, dtype), x_dense)
    if args.peers:
        contenders["per_expert_loop"] = (
            PerExpertLoopMoE(d, h, num_experts, k, args.capacity_factor).to(device, dtype),
            x,
        )
        if num_experts * tokens * math.ceil(k * tokens * args.capacity_factor / num_experts) * 4 < 2**31:
            contenders["onehot_einsum"] = (
                OneHotEinsumMoE(d, h, num_experts, k, args.capacity_factor).to(device, dtype),
                x,
            )
    grads = {name: torch.randn(inp.shape, device=device, dtype=dtype) for name, (_, inp) in contenders.items()}
    runs = {name: (lambda m=m, i=i, g=grads[name]: step(m, i, g)) for name, (m, i) in contenders.items()}

    for fn in runs.values():  # warm-up
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(args.repeats):
        # Interleaved, so noise hits every contender alike; the order changes each round, so no contender always
        # follows the same one (whose freed memory and cold caches the next step pays for), and each timed step
        # comes after --round-warmup untimed ones of its own.
        for name in running_order(list(runs), round_index):
            for _ in range(args.round_warmup):
                runs[name]()
            times[name].append(timed(runs[name], device))
    result: dict[str, float] = {"E": num_experts, "k": k, "T": tokens, "d": d, "h": h}
    for name, samples in times.items():
        med = statistics.median(samples)
        result[f"{name}_ms"] = med * 1e3
        if name != "dense":  # median of the per-round ratios: each pair ran in the same round
            result[f"{name}_efficiency"] = statistics.median(
                dense / other for dense, other in zip(times["dense"], samples)
            )
    moe_s = statistics.median(times["moe"])
    if args.profile:
        print(f"# profile of the MoE step, T={tokens} d={d} h={h} E={num_experts} k={k}")
        result.update(profile_steps(runs["moe"], 3, torch.device(device), top=12))
    if args.ceiling:
        # What the expert GEMMs allow: the six FFN products at T*k/E rows per expert against the same at T*k rows.
        rows = tokens * k // num_experts
        gate_dtype = dtype if args.no_fp32_gating else torch.float32
        result["gemm_ceiling"], result["gemm_gate_ceiling"] = gemm_ceilings(
            rows, num_experts, d, h, device, dtype, gate_dtype, args.repeats
        )
        result["grad_first_touch_ms"] = (
            gradient_first_touch_seconds(num_experts, d, h, device, dtype, args.repeats) * 1e3
        )
    useful_flops = 3 * 2 * 2 * tokens * k * d * h  # fwd + bwd (2x) of two matmuls, T*k rows
    result["moe_tokens_per_s"] = tokens / moe_s
    result["moe_tflops"] = useful_flops / moe_s / 1e12
    if not args.no_memory:
        for name in ("moe", "dense"):
            module = contenders[name][0]
            grad_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
            module.zero_grad(set_to_none=True)  # freed before measuring: the step allocates them anew ...
            # ... except weight gradients written into memory the experts kept from the last step
            kept = sum(memory.nbytes() for memory in map(gradient_memory_of, module.modules()) if memory is not None)
            result[f"{name}_peak_mib"] = (peak_memory_bytes(runs[name], device) + kept - grad_bytes) / 2**20
        result["memory_ratio"] = result["moe_peak_mib"] / result["dense_peak_mib"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one step of each contender per round)")
    add_round_warmup_argument(parser)
    parser.add_argument("--peers", action="store_true", help="also time the peer techniques")
    parser.add_argument("--large", action="store_true", help="add T=16384, d=2048, h=8192, E in {8, 64} (GPU)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also measure the small-GEMM ceiling and the page-fault cost of fresh expert gradients",
    )
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="glibc malloc keeps freed memory (no page faults on reallocation), for every contender",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after timing each shape, profile 3 MoE steps and print the top operators",
    )
    parser.add_argument(
        "--no-fp32-gating",
        action="store_true",
        help="the layer's gate product in the compute dtype (MoE(fp32_gating=False)), as the peers compute theirs",
    )
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.retain_freed_memory:
        if not retain_freed_host_memory():
            raise SystemExit("--retain-freed-memory needs glibc's malloc (Linux)")

    shapes = [(e, k, args.tokens, args.hidden, args.ffn) for e in args.experts for k in args.k]
    if args.large:
        shapes += [(e, k, 16384, 2048, 8192) for e in (8, 64) for k in (1, 2)]
    rows = []
    print(
        f"# torch {torch.__version__}, device={args.device}, dtype={args.dtype}, threads={args.threads}, "
        f"capacity_factor={args.capacity_factor}, fp32 gating {'off' if args.no_fp32_gating else 'on'},"
        f" median of {args.repeats} rounds, {args.round_warmup} untimed step(s) before each timed one"
        + (", malloc retains freed memory" if args.retain_freed_memory else "")
    )
    header = f"{'T':>6} {'d':>5} {'h':>5} {'E':>3} {'k':>2} {'moe ms':>8} {'dense ms':>9} {'eff':>5} {'tok/s':>8} {'TFLOP/s':>8}"
    if not args.no_memory:
        header += f" {'moe MiB':>8} {'dense MiB':>9} {'mem x':>6}"
    if args.peers:
        header += f" {'loop eff':>8} {'einsum eff':>10}"
    if args.ceiling:
        header += f" {'gemm ceil':>9} {'+gate ceil':>10} {'grad fault ms':>13}"
    print(header)
    for e, k, t, d, h in shapes:
        row = measure(e, k, args, t, d, h)
        rows.append(row)
        line = (
            f"{t:>6} {d:>5} {h:>5} {e:>3} {k:>2} {row['moe_ms']:>8.1f} {row['dense_ms']:>9.1f} "
            f"{row['moe_efficiency']:>5.2f} {row['moe_tokens_per_s']:>8.0f} {row['moe_tflops']:>8.3f}"
        )
        if not args.no_memory:
            line += f" {row['moe_peak_mib']:>8.1f} {row['dense_peak_mib']:>9.1f} {row['memory_ratio']:>6.2f}"
        if args.peers:
            loop = row.get("per_expert_loop_efficiency", float("nan"))
            einsum = row.get("onehot_einsum_efficiency", float("nan"))
            line += f" {loop:>8.2f} {einsum:>10.2f}"
        if args.ceiling:
            line += (
                f" {row['gemm_ceiling']:>9.2f} {row['gemm_gate_ceiling']:>10.2f} {row['grad_first_touch_ms']:>13.1f}"
            )
        print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
