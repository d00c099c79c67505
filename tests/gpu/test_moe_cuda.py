"""The MoE layer on CUDA: bf16 numerics against an fp32 loop, the fused ``torch._grouped_mm`` path, host
synchronisations per forward, and ``torch.compile`` of the fused experts."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lightning_moe.moe import MoE
from lightning_moe.moe import experts as experts_mod
from lightning_moe.moe.experts import GroupedFFNExperts
from tests.gpu.helpers import fused_grouped_mm_device, relative_error

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
OUT_TOL = 1e-2  # ||bf16 - fp32|| / ||fp32|| for bf16 operands (METHOD.md: 1e-3 .. 1e-2)
GRAD_TOL = 2e-2  # gradients sum over many rows: a little more rounding


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def grouped_mm_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Record the operand shapes of every ``torch._grouped_mm`` call."""
    calls: list[tuple[int, ...]] = []
    original = torch._grouped_mm

    def counting(a, b, *args, **kwargs):
        calls.append((*a.shape, *b.shape))
        return original(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    return calls


def _pair(expert: str, drop_tokens: bool, k: int, num_experts: int = 8, d: int = 256, h: int = 512) -> tuple[MoE, MoE]:
    """An fp32 layer and a bf16 copy on CUDA; the fp32 one holds exactly the bf16 values, so both route alike."""
    fp32 = MoE(d, num_experts, h, k=k, expert=expert, drop_tokens=drop_tokens, use_rts=False, capacity_factor=1.0)
    fp32 = fp32.cuda()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    with torch.no_grad():
        for p32, p16 in zip(fp32.parameters(), bf16.parameters()):
            p32.copy_(p16.float())
    return fp32, bf16


def _step(layer: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor):
    """Forward + backward through ``layer`` (an MoE or its compiled wrapper); fp32 copies of what came out."""
    module = getattr(layer, "_orig_mod", layer)  # the compiled wrapper prefixes parameter names
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = layer(x, padding_mask=mask)
    ((out.output.float() * grad).sum() + out.aux_loss).backward()
    grads = {n: p.grad.float() for n, p in module.named_parameters()}
    return out.output.float(), out.aux_loss, out.expert_counts, x.grad.float(), grads


def _inputs(tokens: int = 2048, d: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(4, tokens // 4, d, device="cuda").bfloat16()
    mask = torch.zeros(4, tokens // 4, dtype=torch.bool, device="cuda")
    mask[1, tokens // 8 :] = True  # some padding: not routed
    grad = torch.randn(4, tokens // 4, d, device="cuda")
    return x, mask, grad


@pytest.mark.parametrize(
    ("expert", "drop_tokens", "k"),
    [("ffn", True, 1), ("ffn", False, 2), ("glu", True, 2)],
    ids=["ffn-cap-k1", "ffn-dropless-k2", "glu-cap-k2"],
)
def test_bf16_layer_matches_fp32_expert_loop(expert: str, drop_tokens: bool, k: int, grouped_mm_calls) -> None:
    fp32, bf16 = _pair(expert, drop_tokens, k)
    x, mask, grad = _inputs()
    ref = _step(fp32, x.float(), mask, grad)  # fp32: the per-expert loop path
    assert grouped_mm_calls == []
    got = _step(bf16, x, mask, grad)
    if fused_grouped_mm_device():
        # One call per expert matrix, plus one per bias gradient (ffn) in backward.
        assert len(grouped_mm_calls) == (4 if expert == "ffn" else 3), "the fused path was not taken"
    assert torch.equal(got[2], ref[2]), "routing differs"
    assert relative_error(got[0], ref[0]) < OUT_TOL
    torch.testing.assert_close(got[1].float(), ref[1], rtol=1e-4, atol=1e-6)
    assert relative_error(got[3], ref[3]) < GRAD_TOL
    for name in ref[4]:
        assert relative_error(got[4][name], ref[4][name]) < GRAD_TOL, name
    assert all(torch.isfinite(g).all() for g in got[4].values())


@pytest.mark.parametrize("expert", ["ffn", "glu"])
def test_fused_path_equals_bf16_loop_path(expert: str, grouped_mm_calls, monkeypatch) -> None:
    if not fused_grouped_mm_device():
        pytest.skip("no fused grouped GEMM on this GPU (sm90/sm100 only)")
    _, bf16 = _pair(expert, True, 2, num_experts=16)
    x, mask, grad = _inputs()
    fused = _step(bf16, x, mask, grad)
    calls = 4 if expert == "ffn" else 3  # per expert matrix, and per bias gradient in backward
    assert len(grouped_mm_calls) == calls
    monkeypatch.setattr(experts_mod, "_NATIVE_DEVICE_TYPES", ())
    loop = _step(bf16, x, mask, grad)
    assert len(grouped_mm_calls) == calls  # the loop path does not call it
    assert relative_error(fused[0], loop[0]) < OUT_TOL
    assert relative_error(fused[3], loop[3]) < GRAD_TOL
    for name in loop[4]:
        assert relative_error(fused[4][name], loop[4][name]) < GRAD_TOL, name


def test_fused_path_under_autocast_from_fp32_activations(grouped_mm_calls) -> None:
    """bf16-mixed: fp32 weights and fp32 activations (a LayerNorm's output) under autocast take the fused path
    in bf16, and the gradients reach the fp32 parameters. Checked on the experts alone: under autocast the
    router's gate runs in bf16 too, so the routing of a whole layer would differ from the fp32 reference."""
    if not fused_grouped_mm_device():
        pytest.skip("no fused grouped GEMM on this GPU (sm90/sm100 only)")
    experts = GroupedFFNExperts(8, 256, 512).cuda()
    counts = torch.tensor([5, 0, 37, 1, 130, 9, 3, 71], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda")
    g = torch.randn_like(x)
    results = []
    for autocast in (False, True):
        experts.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = experts(xi, counts)
        (out.float() * g).sum().backward()
        results.append([out.float(), xi.grad] + [p.grad for p in experts.parameters()])
    assert len(grouped_mm_calls) == 4  # only the autocast run: two products, two bias gradients
    assert results[1][0].dtype == torch.float32  # compared in fp32 (the fused output itself is bf16)
    for got, ref in zip(results[1], results[0]):
        assert got.dtype == torch.float32  # gradients of fp32 parameters and inputs stay fp32
        assert relative_error(got, ref) < GRAD_TOL


_UNPADDED = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from lightning_moe.moe import experts as ex
    torch.manual_seed(0)
    for alignment in (8, 1):
        ex.NATIVE_GROUP_ALIGNMENT = alignment
        m = ex.GroupedFFNExperts(8, 256, 512).cuda()
        counts = torch.tensor([5, 0, 37, 1, 130, 9, 3, 71], device="cuda")  # no count is a multiple of 8
        x = torch.randn(int(counts.sum()), 256, device="cuda")
        g = torch.randn_like(x)
        ref_out = m(x, counts); ref_out.backward(g)
        ref = [ref_out.detach()] + [p.grad.clone() for p in m.parameters()]
        m.zero_grad(set_to_none=True)
        mb = m.to(torch.bfloat16)
        xb = x.bfloat16().requires_grad_(True)
        out = mb(xb, counts); out.backward(g.bfloat16()); torch.cuda.synchronize()
        got = [out.detach()] + [p.grad for p in mb.parameters()]
        err = max(float((a.double() - b.double()).norm() / b.double().norm()) for a, b in zip(got, ref))
        print(json.dumps({str(alignment): err}), flush=True)  # one line each: a crash of the second keeps the first
    """
)


def test_fused_path_with_unaligned_groups_in_a_subprocess() -> None:
    """Group sizes that are not multiples of 8 rows, with the default padding (must match the fp32 loop) and
    without padding (``NATIVE_GROUP_ALIGNMENT = 1``: informative only, printed). A subprocess, because a
    misaligned TMA access would leave a sticky CUDA error that fails every later test."""
    if not fused_grouped_mm_device():
        pytest.skip("no fused grouped GEMM on this GPU (sm90/sm100 only)")
    proc = subprocess.run([sys.executable, "-c", _UNPADDED, str(REPO)], capture_output=True, text=True, timeout=120)
    print(proc.stdout, proc.stderr[-2000:])
    errors: dict[str, float] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            errors.update(json.loads(line))
    assert "8" in errors, f"the padded run failed: {proc.stderr[-2000:]}"
    unpadded = errors.get("1", f"failed (exit code {proc.returncode})")
    print(f"relative error vs fp32 loop: padded to 8 rows {errors['8']:.2e}, unpadded: {unpadded}")
    assert errors["8"] < GRAD_TOL


def _sync_sites(fn: Callable[[], object]) -> list[str]:
    """``file:line`` of every synchronising CUDA call that ``torch.cuda.set_sync_debug_mode`` reports in ``fn``.

    A lower bound: only operations instrumented by PyTorch warn (``.item()``, ``.tolist()``, device-to-host
    copies, ``nonzero``, stream synchronisation, ...)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]


@pytest.mark.parametrize(
    ("drop_tokens", "padding", "allowed"),
    [(True, False, 1), (False, False, 0), (True, True, 1), (False, True, 1)],
    ids=["capacity", "dropless", "capacity-padding", "dropless-padding"],
)
def test_forward_host_syncs_do_not_grow_with_experts(drop_tokens: bool, padding: bool, allowed: int) -> None:
    """No synchronisation per expert: the count is the same for 8 and 64 experts, and at most one per layer:
    the kept-assignment count (capacity) and/or the real-assignment count (padding), read together; the
    capacity of a padded batch is computed on the device."""
    counts = {}
    for num_experts in (8, 64):
        layer = MoE(256, num_experts, 512, k=2, drop_tokens=drop_tokens).cuda().bfloat16()  # training mode, RTS on
        x = torch.randn(8, 256, 256, device="cuda", dtype=torch.bfloat16)
        mask = None
        if padding:
            mask = torch.zeros(8, 256, dtype=torch.bool, device="cuda")
            mask[:, 200:] = True
        layer(x, padding_mask=mask)  # warm-up: lazy initialisation (handles, workspaces) may synchronise
        _sync_sites(lambda: layer(x, padding_mask=mask))  # ... and so may the first sync-debug window
        counts[num_experts] = _sync_sites(lambda: layer(x, padding_mask=mask))
    print({e: sites for e, sites in counts.items()})
    assert len(counts[8]) == len(counts[64]), counts
    if fused_grouped_mm_device():  # elsewhere the loop path reads the counts once more
        assert len(counts[64]) <= allowed, counts[64]


def test_fused_experts_compile_without_graph_breaks() -> None:
    """The fused path has no host reads: Inductor compiles the experts as one graph (``fullgraph=True``)."""
    if not fused_grouped_mm_device():
        pytest.skip("no fused grouped GEMM on this GPU (sm90/sm100 only)")
    torch._dynamo.reset()
    experts = GroupedFFNExperts(8, 256, 512).cuda().bfloat16()
    compiled = torch.compile(experts, fullgraph=True)
    counts = torch.tensor([5, 0, 37, 1, 130, 9, 3, 71], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    results = []
    for fn in (experts, compiled):
        experts.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        out = fn(xi, counts)
        out.backward(g)
        results.append([out.detach(), xi.grad] + [p.grad for p in experts.parameters()])
    for got, ref in zip(results[1], results[0]):
        assert relative_error(got, ref) < OUT_TOL
    torch._dynamo.reset()


def test_compiled_layer_matches_eager_on_cuda() -> None:
    """The whole layer (graph breaks at the dispatch's host reads) under ``torch.compile``, forward and backward."""
    torch._dynamo.reset()
    _, layer = _pair("ffn", True, 2)
    compiled = torch.compile(layer, backend="aot_eager")
    x, mask, grad = _inputs()
    eager = _step(layer, x, mask, grad)
    comp = _step(compiled, x, mask, grad)
    assert torch.equal(comp[2], eager[2])
    assert relative_error(comp[0], eager[0]) < 1e-3
    for name in eager[4]:
        assert relative_error(comp[4][name], eager[4][name]) < 1e-2, name
    torch._dynamo.reset()
