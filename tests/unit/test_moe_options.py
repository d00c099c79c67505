"""Issue-18 layer options against references: sigmoid scores, aux-loss-free bias, shared experts, drop policy,
PR-MoE expert counts (config, Hydra, checkpoints), router metrics over ranks."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from lightning_moe.callbacks import ROUTER_METRICS, router_metrics
from lightning_moe.models import MoETransformer, count_parameters, get_preset
from lightning_moe.models.config import MoEConfig, TransformerConfig
from lightning_moe.module import transformer_config_from_dict
from lightning_moe.moe import MoE, find_moe_layers
from lightning_moe.moe.router import TopKRouter
from lightning_moe.parallel import update_router_biases
from tests.unit.test_moe_layer import expert_reference


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def _per_token(layer: MoE, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loop: sigmoid or softmax scores, choice by score (+ bias), weights the clean scores."""
    logits = x @ layer.gate.weight.t()  # [T, E]
    scores = torch.sigmoid(logits) if layer.gate.score_func == "sigmoid" else torch.softmax(logits, -1)
    rows = []
    for t in range(x.shape[0]):
        choice = scores[t].detach() + (0 if bias is None else bias)
        chosen = sorted(range(layer.num_experts), key=lambda e: -float(choice[e]))[: layer.k]
        weights = torch.stack([scores[t, e] for e in chosen])
        if layer.gate.normalize_weights:
            weights = weights / weights.sum()
        rows.append(sum(w * expert_reference(layer, e, x[t]) for w, e in zip(weights, chosen)))
    return torch.stack(rows)


# ------------------------------------------------------------------------------------ scores and bias


@pytest.mark.parametrize("k", [1, 2])
def test_sigmoid_scores_equal_the_per_token_loop(k):
    layer = MoE(8, 4, 16, k=k, score_func="sigmoid", drop_tokens=False)
    x = torch.randn(10, 8)
    torch.testing.assert_close(layer(x).output, _per_token(layer, x))
    probs = layer.gate(x).probs
    torch.testing.assert_close(probs.sum(-1), torch.ones(10))  # the normalised distribution of the losses


def test_router_bias_steers_the_choice_not_the_weights():
    layer = MoE(8, 4, 16, k=2, router_bias_update_rate=0.1, drop_tokens=False)
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # expert 3 always chosen, weighted by its clean probability
    layer.gate.expert_bias.copy_(bias)
    x = torch.randn(10, 8)
    out = layer(x)
    assert bool(out.expert_counts[3] == 10)
    torch.testing.assert_close(out.output, _per_token(layer, x, bias))


def test_bias_update_is_rate_times_sign_of_mean_minus_load_and_is_checkpointed():
    layer = MoE(8, 4, 16, k=1, router_bias_update_rate=0.01)
    assert "gate.expert_bias" in layer.state_dict()
    assert "gate.expert_bias" not in MoE(8, 4, 16).state_dict()  # default: state dict keys unchanged
    x = torch.randn(12, 8)
    counts = layer(x).expert_counts + layer(x).expert_counts  # two micro-batches before one step
    layer.eval()
    layer(x)  # evaluation does not count
    load = layer.take_router_load()
    torch.testing.assert_close(load, counts)
    assert layer.take_router_load() is None  # taken
    layer.update_router_bias(torch.tensor([6.0, 2.0, 2.0, 2.0]))  # mean 3
    torch.testing.assert_close(layer.gate.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    restored = MoE(8, 4, 16, k=1, router_bias_update_rate=0.01)
    restored.load_state_dict(layer.state_dict())
    torch.testing.assert_close(restored.gate.expert_bias, layer.gate.expert_bias)
    restored.reset_parameters()
    assert restored.gate.expert_bias.abs().sum() == 0


def test_update_router_biases_single_process_uses_the_pending_loads():
    model = torch.nn.Sequential(MoE(8, 4, 16, k=1, router_bias_update_rate=0.5), MoE(8, 2, 16))
    counts = model[0](torch.randn(16, 8)).expert_counts.float()
    assert update_router_biases(model) == 1  # the layer without a bias is left alone
    torch.testing.assert_close(model[0].gate.expert_bias, 0.5 * torch.sign(counts.mean() - counts))


# ---------------------------------------------------------------------------------------- shared experts


@pytest.mark.parametrize("expert", ["ffn", "glu"])
def test_shared_experts_add_a_dense_ffn_of_their_width(expert):
    layer = MoE(8, 4, 16, k=2, expert=expert, num_shared_experts=2, drop_tokens=False)
    shared = layer.shared_experts
    assert shared.fc1.weight.shape == (32, 8)  # 2 shared experts of width 16
    x = torch.randn(6, 8)
    if expert == "glu":
        dense = (F.silu(x @ shared.fc1.weight.t()) * (x @ shared.fc3.weight.t())) @ shared.fc2.weight.t()
    else:
        dense = F.gelu(x @ shared.fc1.weight.t() + shared.fc1.bias) @ shared.fc2.weight.t() + shared.fc2.bias
    torch.testing.assert_close(layer(x).output, _per_token(layer, x) + dense)


def test_shared_experts_count_as_active_parameters_and_widen_the_dense_twin():
    base = get_preset("tiny", vocab_size=64)
    shared = get_preset("tiny", vocab_size=64, num_shared_experts=1)
    total0, active0 = count_parameters(MoETransformer(base))
    total1, active1 = count_parameters(MoETransformer(shared))
    per_layer = 2 * 128 * 256 + 256 + 128  # fc1 + fc2 with biases
    assert total1 - total0 == active1 - active0 == 2 * per_layer  # one MoE layer in encoder and in decoder
    twin = shared.dense_ffn_hidden_size(1)
    assert twin == base.dense_ffn_hidden_size(1) + 256


# ------------------------------------------------------------------------------------------ drop policy


def test_drop_policy_probs_keeps_the_most_probable_assignments_of_each_expert():
    layer = MoE(8, 4, 16, k=2, drop_policy="probs", capacity_factor=0.5, min_capacity=1)
    x = torch.randn(12, 8)
    routing = layer.gate(x)
    out = layer(x)
    capacity = layer.capacity(12)  # ceil(2 * 12 * 0.5 / 4) = 3
    expected = torch.zeros(12, 8)
    for e in range(4):  # reference: per expert, the assignments with the highest probability
        members = [
            (float(routing.probs[t, e]), t, j) for t in range(12) for j in range(2) if routing.expert_index[t, j] == e
        ]
        for _, t, j in sorted(members, key=lambda m: -m[0])[:capacity]:
            expected[t] += routing.expert_weight[t, j] * expert_reference(layer, e, x[t])
    torch.testing.assert_close(out.output, expected)
    assert layer.last_stats.dropped_fraction > 0


def test_drop_policy_probs_differs_from_position():
    x = torch.randn(32, 8)
    by_probs = MoE(8, 4, 16, k=1, drop_policy="probs", capacity_factor=0.5, min_capacity=1)
    by_position = MoE(8, 4, 16, k=1, use_rts=False, capacity_factor=0.5, min_capacity=1)
    by_position.load_state_dict(by_probs.state_dict())
    assert not torch.equal(by_probs(x).output, by_position(x).output)


def test_fp32_gating_off_runs_the_gate_product_in_bf16_under_autocast_and_keeps_fp32_routing():
    """Default: the gate's logits match a float64 product to fp32 rounding even under bf16 autocast; with
    ``fp32_gating=False`` they carry bf16 rounding (the product ran in bf16) but still come out fp32, and
    gradients reach the fp32 gate weight. Without autocast, in fp32, both settings give the same result."""
    torch.manual_seed(0)
    fp32_gate, bf16_gate = MoE(32, 8, 64, k=2), MoE(32, 8, 64, k=2, fp32_gating=False)
    bf16_gate.load_state_dict(fp32_gate.state_dict())
    x = torch.randn(64, 32)
    exact = (x.double() @ fp32_gate.gate.weight.double().t()).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_fp32, logits_bf16 = fp32_gate.gate(x).logits, bf16_gate.gate(x).logits
        out = bf16_gate(x)
    assert logits_fp32.dtype == logits_bf16.dtype == torch.float32
    assert (logits_fp32 - exact).abs().max() < 1e-5
    bf16_error = float((logits_bf16 - exact).abs().max())
    assert 1e-4 < bf16_error < 0.1, bf16_error
    out.output.float().sum().backward()
    assert bf16_gate.gate.weight.grad is not None and bf16_gate.gate.weight.grad.dtype == torch.float32
    fp32_gate.eval(), bf16_gate.eval()  # no Random Token Selection draws
    torch.testing.assert_close(bf16_gate(x).output, fp32_gate(x).output, rtol=0, atol=0)
    assert "fp32_gating=False" in repr(bf16_gate.gate)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"score_func": "tanh"}, "score_func='tanh'"),
        ({"drop_policy": "random"}, "drop_policy='random'"),
        ({"aux_loss_scope": "world"}, "aux_loss_scope='world'"),
        ({"num_shared_experts": -1}, "num_shared_experts=-1"),
        ({"router_bias_update_rate": -0.1}, "router_bias_update_rate=-0.1"),
    ],
)
def test_bad_option_values_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoE(8, 4, 16, **kwargs)


def test_local_and_global_scope_agree_in_one_process():
    local = MoE(8, 4, 16, k=2)
    global_ = MoE(8, 4, 16, k=2, aux_loss_scope="global")
    global_.load_state_dict(local.state_dict())
    x = torch.randn(10, 8)
    torch.testing.assert_close(local(x).aux_loss, global_(x).aux_loss)


def test_router_rejects_update_without_bias():
    with pytest.raises(ValueError, match="router_bias_update_rate"):
        TopKRouter(8, 4, 1).update_bias(torch.ones(4))


# --------------------------------------------------------------------------------------------- PR-MoE


def test_pyramid_expert_counts_per_moe_layer_in_encoder_then_decoder_order():
    config = get_preset("tiny", vocab_size=64, encoder_layers=4, decoder_layers=2, num_experts=[2, 4, 8])
    assert config.experts_per_moe_layer() == [2, 4, 8]
    model = MoETransformer(config)
    assert [(n, m.num_experts) for n, m in find_moe_layers(model)] == [
        ("encoder_layers.1.ffn", 2),
        ("encoder_layers.3.ffn", 4),
        ("decoder_layers.1.ffn", 8),
    ]
    assert get_preset("tiny", num_experts=4).experts_per_moe_layer() == [4, 4]


@pytest.mark.parametrize(
    ("num_experts", "match"),
    [
        ([4, 4, 8], "3 counts but the model has 2 MoE layers"),
        ([4, 0], r"num_experts\[1\]=0"),
        ([], "num_experts=\\[\\]"),
    ],
)
def test_pyramid_validation_names_the_key(num_experts, match):
    with pytest.raises(ValueError, match=match):
        get_preset("tiny", num_experts=num_experts)


def test_pyramid_k_must_fit_the_smallest_layer():
    with pytest.raises(ValueError, match="moe.k=4"):
        MoEConfig(num_experts=[2, 8], k=4)


def test_pyramid_survives_the_checkpoint_config_round_trip():
    config = get_preset("tiny", vocab_size=64, num_experts=[2, 4], router_bias_update_rate=1e-3, num_shared_experts=1)
    restored = transformer_config_from_dict(asdict(config))
    assert restored == config
    model = MoETransformer(config)
    again = MoETransformer(restored)
    again.load_state_dict(model.state_dict())  # same keys and shapes, bias buffers included
    assert isinstance(TransformerConfig(**asdict(config)).moe, MoEConfig)


def test_hydra_command_line_takes_a_list_of_counts():
    from lightning_moe.config import ConfigError, to_train_config
    from tests.unit.test_config import _compose

    cfg = to_train_config(_compose(["moe.num_experts=[4,8]", "moe.score_func=sigmoid", "moe.num_shared_experts=1"]))
    assert cfg.moe.num_experts == [4, 8] and cfg.transformer.experts_per_moe_layer() == [4, 8]
    with pytest.raises(ConfigError, match="moe.num_experts=\\[4, 8, 8\\] has 3 counts"):
        to_train_config(_compose(["moe.num_experts=[4,8,8]"]))
    with pytest.raises(ConfigError, match="expert_parallel_size=4 does not divide moe.num_experts=\\[4, 6\\]"):
        to_train_config(
            _compose(
                ["moe.num_experts=[4,6]", "strategy=moe_zero", "strategy.expert_parallel_size=4", "trainer.devices=4"]
            )
        )
    with pytest.raises(ValueError, match="moe.fp32_gating='yes' is invalid: use true or false"):
        MoEConfig(num_experts=4, fp32_gating="yes")
    assert to_train_config(_compose(["moe.fp32_gating=false"])).moe.fp32_gating is False
    with pytest.raises(ConfigError, match="moe.upcycle=true needs init_from"):
        to_train_config(_compose(["moe.upcycle=true"]))
    with pytest.raises(ConfigError, match="moe.aux_loss_scope=global .* use strategy=moe_zero"):
        to_train_config(_compose(["moe.aux_loss_scope=global", "strategy=ddp", "trainer.devices=2"]))


# --------------------------------------------------------------------------------------- router metrics


def test_router_metrics_sum_every_rank_by_hand():
    a = MoE(8, 4, 16, k=1, capacity_factor=0.5, min_capacity=1)
    b = MoE(8, 2, 16, k=1)
    xs = [torch.randn(8, 8), torch.randn(6, 8)]  # two "ranks"
    per_rank = []
    for x in xs:
        a(x), b(x)
        per_rank.append([a.last_stats, b.last_stats])
    tables = [router_metrics(stats) for stats in per_rank]  # each rank alone

    # A fake two-rank sum: what strategy.reduce(sum) returns on every rank.
    def reduce_sum(table, reduce_op):
        assert reduce_op == "sum"
        return table + _raw(per_rank[1])

    combined = router_metrics(per_rank[0], reduce_sum, world_size=2)
    assert combined.shape == (2, len(ROUTER_METRICS))
    col = {m: i for i, m in enumerate(ROUTER_METRICS)}
    for layer in range(2):
        s0, s1 = per_rank[0][layer], per_rank[1][layer]
        for metric, attr in (
            ("balance_loss", "balance_loss"),
            ("z_loss", "z_loss"),
            ("router_entropy", "router_entropy"),
        ):
            expected = (float(getattr(s0, attr)) + float(getattr(s1, attr))) / 2
            assert combined[layer, col[metric]].item() == pytest.approx(expected)
        kept = s0.tokens_per_expert + s1.tokens_per_expert
        routed = s0.num_assignments + s1.num_assignments
        assert combined[layer, col["dropped_fraction"]].item() == pytest.approx(1 - kept.sum().item() / routed)
        assert combined[layer, col["max_over_mean_load"]].item() == pytest.approx(
            kept.max().item() / kept.float().mean().item()
        )
        assert tables[0][layer, col["balance_loss"]].item() == pytest.approx(float(s0.balance_loss))
    assert combined[0, col["dropped_fraction"]] > 0


def _raw(stats):
    """The table router_metrics reduces, rebuilt for the fake second rank."""
    captured = {}

    def capture(table, reduce_op):
        captured["table"] = table
        return table

    router_metrics(stats, capture, world_size=1)
    return captured["table"]


# ------------------------------------------------------------------------------------------- upcycling


@pytest.mark.parametrize(
    "options",
    [
        {"num_experts": 4, "k": 2},
        {"num_experts": 4, "k": 1},  # top-1 weights 1/4: the experts' output projection is scaled by 4
        {"num_experts": 4, "k": 2, "expert": "glu"},
        {"num_experts": 4, "k": 1, "use_residual": True},
        {
            "num_experts": [2, 8],
            "k": 2,
            "score_func": "sigmoid",
            "num_shared_experts": 1,
            "router_bias_update_rate": 0.1,
        },
    ],
)
def test_upcycled_model_equals_the_dense_model_exactly_at_step_zero(options):
    from lightning_moe.models.upcycle import upcycle_

    dense = MoETransformer(
        get_preset("tiny", vocab_size=50, num_experts=0, k=1, expert=options.get("expert", "ffn"))
    ).eval()
    moe = MoETransformer(get_preset("tiny", vocab_size=50, drop_tokens=False, **options)).eval()
    src, tgt = torch.randint(3, 50, (3, 7)), torch.randint(3, 50, (3, 6))
    src_mask = torch.zeros(3, 7, dtype=torch.bool)
    src_mask[0, 5:] = True
    before = moe(src, src_mask, tgt, None).logits
    upcycle_(moe, dense)
    expected = dense(src, src_mask, tgt, None).logits
    assert not torch.equal(before, expected)
    assert torch.equal(moe(src, src_mask, tgt, None).logits, expected)  # exact, fp32
    layer = find_moe_layers(moe)[0][1]
    assert layer.gate.weight.abs().sum() == 0
    assert torch.equal(layer.experts.w1[0], layer.experts.w1[-1])  # every expert a copy


def test_upcycling_needs_the_experts_width():
    from lightning_moe.models.upcycle import upcycle_

    twin = MoETransformer(get_preset("tiny", vocab_size=50, num_experts=0, k=2))  # FFNs 2x wider at MoE positions
    moe = MoETransformer(get_preset("tiny", vocab_size=50, k=2))
    with pytest.raises(ValueError, match="encoder_layers.1.ffn.fc1.weight' has shape \\(512, 128\\).*moe.k=1"):
        upcycle_(moe, twin)
    with pytest.raises(ValueError, match="has no 'decoder_layers.0.self_attn"):
        state = {k: v for k, v in twin.state_dict().items() if not k.startswith("decoder_layers.0.self_attn")}
        upcycle_(MoETransformer(get_preset("tiny", vocab_size=50, num_experts=[4, 4])), {**state, **_ffn_of(moe, 256)})


def _ffn_of(model, width):
    """Dense FFN weights of the experts' width at the MoE positions of ``model``."""
    return {
        f"{name}.{part}": torch.zeros(shape)
        for name, _ in find_moe_layers(model)
        for part, shape in (
            ("fc1.weight", (width, 128)),
            ("fc1.bias", (width,)),
            ("fc2.weight", (128, width)),
            ("fc2.bias", (128,)),
        )
    }


# ------------------------------------------------------------------------ the bias update in a Lightning run


def test_router_bias_update_runs_once_per_optimizer_step_with_accumulation(monkeypatch):
    import lightning.pytorch as pl

    import lightning_moe.parallel.balancing as balancing
    from lightning_moe.callbacks import RouterBiasUpdate
    from tests.distributed.tiny_moe import TinyMoEModel, make_batches

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyMoEModel(num_experts=4, k=1, router_bias_update_rate=0.01)

        def training_step(self, batch, batch_idx):
            return self.net(*batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    updates: list[list[torch.Tensor]] = []
    real = balancing.update_router_biases

    def spy(model, group=None):
        # The loads each update reads: both micro-batches of its step.
        updates.append([layer._pending_load.clone() for _, layer in find_moe_layers(model)])
        return real(model, group)

    monkeypatch.setattr(balancing, "update_router_biases", spy)
    module = Module()
    layer = module.net.blocks[1].moe
    counted: list[torch.Tensor] = []
    layer.register_forward_hook(lambda m, args, out: counted.append(out.expert_counts.clone()))
    trainer = pl.Trainer(
        max_steps=2,
        accumulate_grad_batches=2,
        callbacks=[RouterBiasUpdate()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(make_batches(4), batch_size=None))
    assert len(updates) == 2  # two optimizer steps, four batches
    torch.testing.assert_close(updates[0][0], counted[0] + counted[1])
    torch.testing.assert_close(updates[1][0], counted[2] + counted[3])
    expected = sum(0.01 * torch.sign(u[0].float().mean() - u[0].float()) for u in updates)
    torch.testing.assert_close(layer.gate.expert_bias, expected)
