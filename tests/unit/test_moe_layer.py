"""The MoE layer against simple references: hand-computed router maths, a per-token loop, a dense FFN."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_moe.moe import MoE, compute_capacity, grouped_mm, plan_dispatch
from lightning_moe.moe.router import TopKRouter, router_losses


def reference_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every token through its chosen experts one at a time, no capacity (a dropless reference)."""
    tokens = x.reshape(-1, layer.hidden_size)
    gate_dtype = torch.promote_types(tokens.dtype, torch.float32)
    probs = torch.softmax(tokens.to(gate_dtype) @ layer.gate.weight.to(gate_dtype).t(), dim=-1)
    weights, index = torch.topk(probs, layer.k, dim=-1)
    if layer.k > 1:
        weights = weights / weights.sum(-1, keepdim=True)
    rows = []
    for t in range(tokens.shape[0]):
        acc = torch.zeros(layer.hidden_size, dtype=x.dtype)
        for j in range(layer.k):
            acc = acc + weights[t, j].to(x.dtype) * expert_reference(layer, int(index[t, j]), tokens[t])
        rows.append(acc)
    return torch.stack(rows).reshape(x.shape)


def expert_reference(layer: MoE, e: int, row: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    if hasattr(ex, "w3"):  # GLU
        return (F.silu(row @ ex.w1[e]) * (row @ ex.w3[e])) @ ex.w2[e]
    h = F.gelu(row @ ex.w1[e] + ex.b1[e])
    return h @ ex.w2[e] + ex.b2[e]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# ---------------------------------------------------------------------------------------------- router


def test_router_maths_against_hand_computed_case():
    router = TopKRouter(hidden_size=2, num_experts=3, k=2)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    out = router(x)
    # token 0: logits (2, 0, 0); token 1: logits (0, 1, 0)
    e2 = math.exp(2.0)
    p0 = [e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)]
    e1 = math.exp(1.0)
    p1 = [1 / (e1 + 2), e1 / (e1 + 2), 1 / (e1 + 2)]
    torch.testing.assert_close(out.probs, torch.tensor([p0, p1]))
    assert out.expert_index[0, 0] == 0 and out.expert_index[1, 0] == 1
    # top-2 weights renormalised: first choice / (first + second)
    torch.testing.assert_close(out.expert_weight[0, 0], torch.tensor(p0[0] / (p0[0] + p0[1])))
    torch.testing.assert_close(out.expert_weight[1].sum(), torch.tensor(1.0))

    routed = torch.bincount(out.expert_index.reshape(-1), minlength=3)
    balance, z, entropy = router_losses(out, routed, None, k=2)
    f = routed.float() / 4
    mean_p = torch.tensor([p0, p1]).mean(0)
    torch.testing.assert_close(balance, 3 * (f * mean_p).sum())
    z_expected = (math.log(e2 + 2) ** 2 + math.log(e1 + 2) ** 2) / 2
    torch.testing.assert_close(z, torch.tensor(z_expected))
    h = lambda p: -sum(v * math.log(v) for v in p)  # noqa: E731
    torch.testing.assert_close(entropy, torch.tensor((h(p0) + h(p1)) / 2))


def test_balance_loss_is_one_for_uniform_router():
    router = TopKRouter(4, 4, 1)
    with torch.no_grad():
        router.weight.zero_()
    x = torch.randn(8, 4)
    out = router(x)
    routed = torch.tensor([2, 2, 2, 2])
    balance, _, entropy = router_losses(out, routed, None, k=1)
    torch.testing.assert_close(balance, torch.tensor(1.0))
    torch.testing.assert_close(entropy, torch.tensor(math.log(4)))


def test_gating_runs_in_fp32_for_bf16_inputs():
    layer = MoE(16, 4, 32, k=2, drop_tokens=False).to(torch.bfloat16)
    x = torch.randn(10, 16, dtype=torch.bfloat16)
    routing = layer.gate(x)
    assert routing.logits.dtype == torch.float32 and routing.expert_weight.dtype == torch.float32
    out, aux, _ = layer(x)
    assert out.dtype == torch.bfloat16 and aux.dtype == torch.float32


def test_gating_stays_fp32_under_autocast():
    layer = MoE(16, 4, 32, k=2, drop_tokens=False)
    x = torch.randn(10, 16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        routing = layer.gate(x)
    assert routing.logits.dtype == torch.float32
    torch.testing.assert_close(routing.logits, x @ layer.gate.weight.t())


# -------------------------------------------------------------------------------------------- capacity


def test_compute_capacity():
    assert compute_capacity(100, 8, 1, 1.0, 4) == 13  # ceil(12.5)
    assert compute_capacity(100, 8, 2, 1.25, 4) == 32  # ceil(31.25)
    assert compute_capacity(8, 8, 1, 1.0, 4) == 4  # min_capacity wins


def test_capacity_keeps_first_tokens_and_first_choices_first():
    # 4 tokens, top-2, 2 experts; every token's first choice is expert 0, second expert 1.
    index = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    weight = torch.full((4, 2), 0.5)
    plan = plan_dispatch(index, weight, num_experts=2, capacity=3)
    # expert 0: first choices of tokens 0,1,2 fill it; token 3's second choice is dropped.
    # expert 1: token 3's first choice before the second choices of tokens 0,1 (token 2's dropped).
    assert plan.tokens_per_expert.tolist() == [3, 3]
    assert plan.token_index.tolist() == [0, 1, 2, 3, 0, 1]
    assert plan.routed_per_expert.tolist() == [4, 4]


def test_dropped_tokens_produce_zero_output_and_are_counted():
    layer = MoE(8, 2, 16, k=1, capacity_factor=0.5, min_capacity=1, use_rts=False)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0, 0] = 10.0  # every token with x[:,0] > 0 picks expert 0
    x = torch.randn(16, 8)
    x[:, 0] = 1.0
    out, _, counts = layer(x)
    capacity = layer.capacity(16)
    assert capacity == 4
    assert counts.tolist() == [16, 0]
    assert layer.last_stats.tokens_per_expert.tolist() == [4, 0]
    torch.testing.assert_close(layer.last_stats.dropped_fraction, torch.tensor(12 / 16))
    # without RTS the first `capacity` tokens are kept, the rest get a zero output
    assert torch.all(out[:4].abs().sum(-1) > 0)
    assert torch.all(out[4:] == 0)


def test_eval_uses_eval_capacity_factor():
    layer = MoE(8, 4, 16, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=0)
    assert layer.capacity(40) == 10
    layer.eval()
    assert layer.capacity(40) == 20


def test_eval_without_drops_routes_every_token_in_eval_only():
    torch.manual_seed(0)
    layer = MoE(8, 4, 16, k=1, capacity_factor=0.25, eval_capacity_factor=0.25, min_capacity=0, use_rts=False)
    dropless = MoE(8, 4, 16, k=1, drop_tokens=False)
    dropless.load_state_dict(layer.state_dict())
    layer.eval_drop_tokens = False
    x = torch.randn(40, 8)
    assert layer.capacity(40) == 3  # training keeps its capacity
    layer(x)
    assert float(layer.last_stats.dropped_fraction) > 0.5
    layer.eval(), dropless.eval()
    assert layer.capacity(40) is None
    torch.testing.assert_close(layer(x).output, dropless(x).output)
    assert float(layer.last_stats.dropped_fraction) == 0.0


def test_random_token_selection_varies_kept_tokens_in_training_only():
    layer = MoE(8, 2, 16, k=1, capacity_factor=0.25, min_capacity=1, use_rts=True)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0, 0] = 10.0
    x = torch.randn(32, 8)
    x[:, 0] = 1.0
    kept_sets = set()
    for seed in range(5):
        torch.manual_seed(seed)
        out, _, _ = layer(x)
        kept_sets.add(tuple((out.abs().sum(-1) > 0).nonzero().flatten().tolist()))
    assert len(kept_sets) > 1  # random priority
    assert all(len(s) == layer.capacity(32) for s in kept_sets)
    layer.eval()
    kept_eval = {tuple((layer(x).output.abs().sum(-1) > 0).nonzero().flatten().tolist()) for _ in range(3)}
    assert kept_eval == {tuple(range(layer.capacity(32)))}  # deterministic, token order


def test_dropless_equals_capacity_mode_when_nothing_is_dropped():
    capacity_layer = MoE(16, 4, 32, k=2, capacity_factor=100.0, use_rts=True)
    dropless = MoE(16, 4, 32, k=2, drop_tokens=False)
    dropless.load_state_dict(capacity_layer.state_dict())
    x = torch.randn(2, 7, 16)
    a = capacity_layer(x)
    b = dropless(x)
    torch.testing.assert_close(a.output, b.output)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)
    assert capacity_layer.last_stats.dropped_fraction == 0


# -------------------------------------------------------------------------------------------- experts


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("expert", ["ffn", "glu"])
def test_grouped_experts_equal_per_token_loop(k, expert):
    layer = MoE(16, 6, 24, k=k, expert=expert, drop_tokens=False)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    layer.double()
    out = layer(x).output
    ref = reference_moe(layer, x)
    torch.testing.assert_close(out, ref)
    # gradients through experts and gates
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, layer.gate.weight, layer.experts.w1, layer.experts.w2], g)
    ref_grads = torch.autograd.grad(ref, [x, layer.gate.weight, layer.experts.w1, layer.experts.w2], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_one_expert_top1_equals_dense_ffn():
    dense = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    layer = MoE(16, 1, 32, k=1, drop_tokens=False)
    with torch.no_grad():
        layer.experts.w1[0].copy_(dense[0].weight.t())
        layer.experts.b1[0].copy_(dense[0].bias)
        layer.experts.w2[0].copy_(dense[2].weight.t())
        layer.experts.b2[0].copy_(dense[2].bias)
    x = torch.randn(4, 6, 16, requires_grad=True)
    out = layer(x).output
    ref = dense(x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(out, [x, layer.experts.w1], g)
    rx, rw = torch.autograd.grad(ref, [x, dense[0].weight], g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw[0], rw.t())


def test_user_module_experts_equal_per_expert_loop():
    template = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 8))
    layer = MoE(8, 3, 12, k=2, expert=template, drop_tokens=False)
    ex = layer.experts
    assert ex.__getattr__("0__weight").shape == (3, 12, 8)
    # experts get different initialisations
    assert not torch.equal(ex.__getattr__("0__weight")[0], ex.__getattr__("0__weight")[1])
    x = torch.randn(10, 8, requires_grad=True)
    out = layer(x).output

    def expert_fn(e, row):
        h = torch.tanh(row @ ex.__getattr__("0__weight")[e].t() + ex.__getattr__("0__bias")[e])
        return h @ ex.__getattr__("2__weight")[e].t() + ex.__getattr__("2__bias")[e]

    probs = torch.softmax(x @ layer.gate.weight.t(), -1)
    w, idx = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    ref = torch.stack([sum(w[t, j] * expert_fn(int(idx[t, j]), x[t]) for j in range(2)) for t in range(10)])
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert ex.__getattr__("0__weight").grad is not None


def test_grouped_mm_odd_sizes_empty_groups_and_expanded_grad():
    x = torch.randn(7, 5, requires_grad=True)  # odd hidden size
    w = torch.randn(4, 5, 3, requires_grad=True)
    b = torch.randn(4, 3, requires_grad=True)
    counts = torch.tensor([3, 0, 4, 0])
    out = grouped_mm(x, w, counts, b)
    ref = torch.cat([x[:3] @ w[0] + b[0], x[3:] @ w[2] + b[2]])
    torch.testing.assert_close(out, ref)
    out.sum().backward()  # sum() sends an expanded (stride-0) gradient
    assert torch.all(w.grad[1] == 0) and torch.all(w.grad[3] == 0)
    torch.testing.assert_close(w.grad[0], x[:3].detach().t() @ torch.ones(3, 3))
    torch.testing.assert_close(b.grad[2], torch.full((3,), 4.0))


def test_grouped_mm_gradcheck_float64():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([2, 0, 4])
    assert torch.autograd.gradcheck(lambda x, w, b: grouped_mm(x, w, counts, b), (x, w, b))


def test_layer_gradcheck_float64_through_gates_and_experts():
    layer = MoE(4, 3, 5, k=2, drop_tokens=False).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    names = ["gate.weight", "experts.w1", "experts.b2"]
    params = [dict(layer.named_parameters())[n].detach().clone().requires_grad_(True) for n in names]

    def fn(x, *ps):
        out, aux, _ = torch.func.functional_call(layer, dict(zip(names, ps)), (x,))
        return out, aux

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("policy", ["jitter", "rsample", "Jitter", "RSample"])
def test_noise_only_in_training(policy):
    layer = MoE(16, 8, 16, k=1, noisy_gate_policy=policy, drop_tokens=False)
    x = torch.randn(64, 16)
    layer.train()
    a = layer(x).output
    b = layer(x).output
    assert not torch.equal(a, b)
    layer.eval()
    c = layer(x).output
    d = layer(x).output
    assert torch.equal(c, d)
    clean = MoE(16, 8, 16, k=1, drop_tokens=False).eval()
    clean.load_state_dict(layer.state_dict())
    torch.testing.assert_close(c, clean(x).output)


# -------------------------------------------------------------------------------------------- padding


def test_padding_is_not_routed_takes_no_capacity_and_counts_in_no_loss():
    layer = MoE(16, 4, 32, k=2, capacity_factor=1.0, min_capacity=0, use_rts=False)
    real = torch.randn(2, 5, 16)
    padded = torch.cat([real, torch.randn(2, 3, 16) * 100], dim=1)  # 3 padding positions, huge values
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 5:] = True
    out_p, aux_p, counts_p = layer(padded, mask)
    out_r, aux_r, counts_r = layer(real)
    torch.testing.assert_close(out_p[:, :5], out_r)
    assert torch.all(out_p[:, 5:] == 0)
    assert counts_p.tolist() == counts_r.tolist() and int(counts_p.sum()) == 2 * 5 * 2
    torch.testing.assert_close(aux_p, aux_r)
    assert layer.capacity(10) == math.ceil(2 * 10 / 4)


def test_all_padding_batch_is_safe():
    layer = MoE(8, 2, 8, k=1)
    x = torch.randn(3, 8, requires_grad=True)
    out, aux, counts = layer(x, torch.ones(3, dtype=torch.bool))
    assert torch.all(out == 0) and int(counts.sum()) == 0 and torch.isfinite(aux)
    (out.sum() + aux).backward()


# ------------------------------------------------------------------------------------------- residual


def test_residual_moe_mixes_dense_and_expert_outputs():
    layer = MoE(8, 2, 16, k=1, use_residual=True, drop_tokens=False)
    x = torch.randn(6, 8)
    out = layer(x).output
    coef = torch.softmax(layer.residual_coef(x), -1)
    plain = MoE(8, 2, 16, k=1, drop_tokens=False)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k.startswith(("gate", "experts"))})
    expected = plain(x).output * coef[:, :1] + layer.residual_mlp(x) * coef[:, 1:]
    torch.testing.assert_close(out, expected)


def test_aux_loss_weights_and_unpacking():
    layer = MoE(8, 4, 8, k=1, aux_loss_coef=0.5, z_loss_coef=0.25)
    output, l_aux, exp_counts = layer(torch.randn(12, 8))
    s = layer.last_stats
    torch.testing.assert_close(l_aux, 0.5 * s.balance_loss + 0.25 * s.z_loss)
    assert exp_counts.shape == (4,) and int(exp_counts.sum()) == 12


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=5), "k=5 must be at most num_experts=4"),
        (dict(k=0), "k=0 must be a positive integer"),
        (dict(capacity_factor=0.0), "capacity_factor=0.0 must be > 0"),
        (dict(eval_capacity_factor=-1.0), "eval_capacity_factor"),
        (dict(noisy_gate_policy="gaussian"), "noisy_gate_policy='gaussian' is not supported"),
        (dict(expert="moe"), "expert='moe' is not supported"),
        (dict(activation="swish2"), "activation='swish2' is not supported"),
        (dict(min_capacity=-1), "min_capacity=-1"),
        (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoE(8, 4, 16, **kwargs)


def test_wrong_input_width_and_mask_shape():
    layer = MoE(8, 4, 16)
    with pytest.raises(ValueError, match=r"inputs \[..., 8\]"):
        layer(torch.randn(3, 9))
    with pytest.raises(ValueError, match="padding_mask"):
        layer(torch.randn(2, 3, 8), torch.zeros(3, 2, dtype=torch.bool))


def test_layer_runs_its_experts_through_the_token_dispatcher():
    from lightning_moe.moe import TokenDispatcher

    torch.manual_seed(0)
    layer = MoE(hidden_size=8, num_experts=4, ffn_hidden_size=16, k=2).eval()  # eval: no random token selection
    assert type(layer.token_dispatcher) is TokenDispatcher and "(token_dispatcher): TokenDispatcher()" in repr(layer)
    assert not any(k.startswith("token_dispatcher") for k in layer.state_dict())  # no state: keys unchanged
    x = torch.randn(2, 5, 8)
    expected = layer(x).output

    class Doubling(TokenDispatcher):  # a swapped dispatcher sees the experts, the rows and the counts
        def forward(self, experts, rows, tokens_per_expert):
            assert int(tokens_per_expert.sum()) == rows.shape[0] and tokens_per_expert.numel() == 4
            return 2 * experts(rows, tokens_per_expert)

    layer.token_dispatcher = Doubling()
    torch.testing.assert_close(layer(x).output, 2 * expected)


def test_replicated_experts_with_no_rows_still_reach_every_parameter():
    # A rank that receives no rows must still produce gradients (zeros) for its peers' collectives.
    layer = MoE(hidden_size=8, num_experts=2, ffn_hidden_size=8, expert=nn.Linear(8, 8))
    x = torch.zeros(0, 8, requires_grad=True)
    y = layer.experts(x, torch.zeros(2, dtype=torch.long))
    y.sum().backward()
    assert x.grad is not None
    for name, p in layer.experts.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


@pytest.mark.parametrize("expert", ["ffn", "glu"])
def test_keep_gradient_memory_switches_the_experts_memory(expert):
    layer = MoE(hidden_size=8, num_experts=2, ffn_hidden_size=8, expert=expert)
    layer(torch.randn(6, 8)).output.sum().backward()
    memory = layer.experts.gradient_memory
    assert memory.enabled and memory.nbytes() > 0
    layer.keep_gradient_memory(False)
    assert not memory.enabled and memory.nbytes() == 0
    layer.keep_gradient_memory(True)
    assert memory.enabled
    MoE(hidden_size=8, num_experts=2, ffn_hidden_size=8, expert=nn.Linear(8, 8)).keep_gradient_memory(
        False
    )  # none kept
