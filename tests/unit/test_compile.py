"""``torch.compile`` runs the MoE layer and the MoE transformer, forward and backward, and matches eager.

The dispatch reads one or two sizes on the host per layer (the kept-assignment count, the real-token
count with padding), so dynamo breaks the graph there; the CPU loop path of the experts is
``torch.compiler.disable``-d (its group bounds live on the host). Graph breaks are accepted here: what
must hold is that compiled code runs and computes what eager code computes. The ``aot_eager`` backend
(dynamo + AOTAutograd, no code generation) keeps the layer tests fast; the whole transformer and Inductor
(C++ code generation on CPU) run in ``slow`` tests. On CUDA the fused expert path has no host reads and
traces into the graph (the GPU check compiles it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
import torch._dynamo

from lightning_moe.models import MoETransformer
from lightning_moe.moe import MoE
from tests.small_models import small_config


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Small problems, one thread; no compiled code or counters leak between tests; quiet graph-break logs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    logger = logging.getLogger("torch._dynamo")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None}


def _layer_step(
    call: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, padding_mask: torch.Tensor, weight: torch.Tensor
):
    """One forward + backward through ``call`` (eager ``layer`` or its compiled wrapper); grads read off ``layer``."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = call(x, padding_mask=padding_mask)
    loss = (out.output * weight).sum() + out.aux_loss
    loss.backward()
    return out.output.detach(), out.aux_loss.detach(), out.expert_counts, x.grad, _grads(layer)


def _check_layer(backend: str, drop_tokens: bool, expert: str) -> None:
    torch.manual_seed(0)
    layer = MoE(16, 4, 32, k=2, expert=expert, drop_tokens=drop_tokens, use_rts=False, capacity_factor=1.0)
    compiled = torch.compile(layer, backend=backend)
    for step in range(2):  # the second call runs the cached (or recompiled) code on new routing
        x = torch.randn(3, 10, 16)
        padding_mask = torch.zeros(3, 10, dtype=torch.bool)
        padding_mask[0, 7:] = True
        padding_mask[2, 4:] = True
        weight = torch.randn(3, 10, 16)
        eager = _layer_step(layer, layer, x, padding_mask, weight)
        comp = _layer_step(compiled, layer, x, padding_mask, weight)
        torch.testing.assert_close(comp[0], eager[0], rtol=1e-5, atol=1e-6, msg=f"output, call {step}")
        torch.testing.assert_close(comp[1], eager[1], rtol=1e-5, atol=1e-7, msg=f"aux loss, call {step}")
        assert torch.equal(comp[2], eager[2])
        torch.testing.assert_close(comp[3], eager[3], rtol=1e-4, atol=1e-6, msg=f"input grad, call {step}")
        assert comp[4].keys() == eager[4].keys()
        for name in eager[4]:
            torch.testing.assert_close(comp[4][name], eager[4][name], rtol=1e-4, atol=1e-6, msg=f"{name}, call {step}")


@pytest.mark.parametrize(
    ("drop_tokens", "expert"), [(True, "ffn"), (False, "glu")], ids=["capacity-ffn", "dropless-glu"]
)
def test_compiled_moe_layer_matches_eager(drop_tokens: bool, expert: str) -> None:
    _check_layer("aot_eager", drop_tokens, expert)


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(5, vocab, (4, 9), generator=g)
    tgt = torch.randint(5, vocab, (4, 8), generator=g)
    src_pad = torch.zeros_like(src, dtype=torch.bool)
    src_pad[1, 6:] = True
    tgt_pad = torch.zeros_like(tgt, dtype=torch.bool)
    tgt_pad[3, 5:] = True
    return {
        "src": src,
        "src_padding_mask": src_pad,
        "tgt_in": tgt,
        "tgt_out": tgt.roll(-1, 1),
        "tgt_padding_mask": tgt_pad,
    }


def _model_step(call: torch.nn.Module, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """One loss + backward through ``call`` (eager ``model`` or its compiled wrapper); grads read off ``model``."""
    model.zero_grad(set_to_none=True)
    out = call(batch["src"], batch["src_padding_mask"], batch["tgt_in"], batch["tgt_padding_mask"])
    logits = out.logits.float()
    mask = ~batch["tgt_padding_mask"]
    ce = torch.nn.functional.cross_entropy(logits[mask], batch["tgt_out"][mask])
    (ce + out.aux_loss).backward()
    return ce.detach(), out.aux_loss.detach(), _grads(model)


def _check_model(backend: str) -> None:
    torch.manual_seed(0)
    shape = {"num_heads": 2, "ffn_hidden_size": 64, "encoder_layers": 1, "decoder_layers": 1, "max_positions": 16}
    routing = {"moe_every": 1, "use_rts": False, "capacity_factor": 1.0, "drop_tokens": True}
    config = small_config(40, 4, **shape, **routing)
    model = MoETransformer(config)
    compiled = torch.compile(model, backend=backend)
    batch = _batch(config.vocab_size)
    eager_ce, eager_aux, eager_grads = _model_step(model, model, batch)
    comp_ce, comp_aux, comp_grads = _model_step(compiled, model, batch)
    torch.testing.assert_close(comp_ce, eager_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comp_aux, eager_aux, rtol=1e-5, atol=1e-7)
    assert comp_grads.keys() == eager_grads.keys()
    assert any(".experts." in name for name in comp_grads)  # the experts were trained through compiled code
    for name in eager_grads:
        torch.testing.assert_close(comp_grads[name], eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow  # ~15 s on 2 shared cores: dynamo traces every block, with breaks at the MoE layers
def test_compiled_moe_transformer_matches_eager() -> None:
    _check_model("aot_eager")


@pytest.mark.slow  # C++ code generation: ~45 s on 2 cores with a cold Inductor cache
def test_inductor_moe_layer_matches_eager() -> None:
    _check_layer("inductor", True, "ffn")


def test_fused_expert_path_traces_as_one_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused ``torch._grouped_mm`` path (forced onto CPU, where torch has a reference kernel; bf16, as the
    fake-tensor rules of the op require) compiles with ``fullgraph=True``: no host reads, no graph breaks,
    in bf16 and under autocast from fp32 - what the GPU check then compiles with Inductor on CUDA."""
    from lightning_moe.moe import experts as experts_mod

    monkeypatch.setattr(experts_mod, "_NATIVE_DEVICE_TYPES", ("cuda", "cpu"))
    torch.manual_seed(0)
    experts = experts_mod.GroupedFFNExperts(4, 16, 32).bfloat16()
    compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")
    counts = torch.tensor([3, 0, 9, 2])
    x = torch.randn(14, 16, dtype=torch.bfloat16)
    results = []
    for fn in (experts, compiled):
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = fn(xi, counts)
        out.float().square().sum().backward()
        results.append([out, xi.grad] + [p.grad for p in experts.parameters()])
    for got, ref in zip(results[1], results[0]):
        torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    experts.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x.float(), counts)  # a recompilation for fp32 inputs, again without graph breaks
    assert out.dtype == torch.bfloat16
