"""Tensor parallelism inside the ZeRO engine: tp=2/4 (alone, with ep and every ZeRO stage) == one process.

The model is the library's encoder-decoder MoE transformer (attention, dense FFNs, MoE layers, untied
embeddings and head, or one tied table split for both uses, so every tensor-parallel style is used).
The ``tp`` ranks of one data-parallel rank read the same batch; data-parallel ranks read their slice of
the global batch. Batches have no padding, so the mean of per-rank token means is the global mean. With
data parallelism the load-balancing loss is off (a product of batch means, see ``tiny_moe.py``); with
``dp = 1`` it stays on, which checks that tensor parallelism keeps the aux losses at the ``tp = 1`` scale.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lightning_moe.models import MoETransformer, greedy_decode
from lightning_moe.moe import TokenDispatcher, find_moe_layers
from lightning_moe.parallel import (
    ParallelDims,
    clip_grad_norm_,
    expert_counts,
    mixed_precision_policy,
    no_gradient_sync,
    offload_optimizer,
    parallelize,
    submesh,
)
from lightning_moe.parallel.expert_parallel import AllToAllTokenDispatcher
from lightning_moe.parallel.tensor_parallel import (
    TokenSplitDispatcher,
    apply_tensor_parallel,
    row_split_sizes,
    tensor_parallel_plan,
)
from tests.distributed.harness import run_ranks
from tests.small_models import small_config

pytestmark = pytest.mark.distributed

VOCAB, LR, STEPS = 48, 1e-2, 3


def _config(tie: bool = False, aux: float = 0.0, heads: int = 4, **overrides: Any):
    settings: dict[str, Any] = dict(
        num_heads=heads, ffn_hidden_size=32, tie_embeddings=tie, aux_loss_coef=aux, z_loss_coef=1e-3
    )
    return small_config(VOCAB, **{**settings, **overrides})


def _model(**kw: Any) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(_config(**kw))


def _batches(steps: int, batch: int = 4, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        src = torch.randint(5, VOCAB, (batch, 7), generator=gen)
        tgt = torch.randint(5, VOCAB, (batch, 6), generator=gen)
        out.append({"src": src, "tgt_in": tgt, "tgt_out": torch.roll(tgt, -1, 1)})
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter gathered to its full value (collective)."""
    return {n: _full(p) for n, p in model.named_parameters()}


def _full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every gradient gathered to its full value (collective). AdamW ignores a gradient's scale, so the
    parameters alone would not show a gradient averaged over the wrong number of ranks."""
    return {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, foreach=True)


@functools.cache
def _reference(tie: bool, aux: float, clip: float | None = None) -> dict[str, Any]:
    """One process, global batches."""
    model = _model(tie=tie, aux=aux)
    opt = _optimizer(model)
    losses, norms, grads = [], [], {}
    for batch in _batches(STEPS):
        loss, _ = model.loss(batch)
        loss.backward()
        grads = grads or _full_grads(model)
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "params": _full_params(model), "norms": norms, "grads": grads}


def _train(
    rank: int,
    world_size: int,
    *,
    tp: int,
    ep: int = 1,
    stage: int = 2,
    offload: str = "none",
    tie: bool = False,
    aux: float = 0.0,
    clip: float | None = None,
    accum: int = 1,
    activation_checkpointing: bool = False,
    precision: str | None = None,
) -> dict[str, Any]:
    model = _model(tie=tie, aux=aux)
    dims = ParallelDims(world_size, ep, tensor_parallel_size=tp, zero_stage=stage, offload=offload)
    dims = dims.resolve(expert_counts(model))
    mesh = dims.build_mesh("cpu")
    parallelize(
        model,
        mesh,
        dims,
        mp_policy=mixed_precision_policy(precision),
        activation_checkpointing=activation_checkpointing,
    )
    for _, layer in find_moe_layers(model):  # the row split wraps the all-to-all (or the local dispatcher)
        assert isinstance(layer.token_dispatcher, TokenSplitDispatcher) == (tp > 1)
        inner = layer.token_dispatcher.inner if tp > 1 else layer.token_dispatcher
        assert type(inner) is (AllToAllTokenDispatcher if dims.ep > 1 else TokenDispatcher)
    opt = _optimizer(model)
    if offload == "optimizer":
        opt = offload_optimizer(opt)
    dp_mesh = submesh(mesh, "dp")
    dp, dp_rank = dp_mesh.size(), dp_mesh.get_local_rank()
    losses, norms, grads = [], [], {}
    for batch in _batches(STEPS):
        local = {k: v.chunk(dp)[dp_rank] for k, v in batch.items()}  # tp ranks of one dp rank: same batch
        total = torch.zeros(())
        for micro in range(accum):
            micro_batch = {k: v.chunk(accum)[micro] for k, v in local.items()}
            last = micro == accum - 1
            with no_gradient_sync(model) if not last else _nullcontext():
                loss, _ = model.loss(micro_batch)
                (loss / accum).backward()
            total += loss.detach() / accum
        grads = grads or _full_grads(model)
        if clip is not None:
            norms.append(clip_grad_norm_(model.parameters(), clip).item())
        opt.step()
        opt.zero_grad()
        dist.all_reduce(total)
        losses.append(total.item() / world_size)
    placements = {n: str(p.placements) for n, p in model.named_parameters()}
    return {"losses": losses, "params": _full_params(model), "grads": grads, "norms": norms, "placements": placements}


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _check(results: list[dict[str, Any]], *, tie: bool = False, aux: float = 0.0, clip: float | None = None) -> None:
    ref = _reference(tie, aux, clip)
    for rank, result in enumerate(results):
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=1e-5)
        assert result["params"].keys() == ref["params"].keys(), f"rank {rank}: parameter names changed"
        assert result["grads"].keys() == ref["grads"].keys(), f"rank {rank}: gradients missing"
        for name, value in result["grads"].items():  # first step, before any optimizer update
            torch.testing.assert_close(
                value, ref["grads"][name], rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {rank} grad {name}: {m}"
            )
        for name, value in result["params"].items():
            if name.endswith("k_proj.bias"):
                # Softmax ignores a shift shared by every key, so this gradient is rounding noise around 0
                # that AdamW normalises to full-size steps: no reference can match it.
                continue
            # AdamW turns an element whose first gradient is ~0 (rounding noise, different in every reduction
            # order; e.g. 6e-8 against a median of 1e-2) into a first step of up to lr: those elements may
            # differ by lr per step; every other element within 5e-4 (measured up to 2e-4 after 3 steps).
            expected = ref["params"][name]
            noise = ref["grads"][name].abs() <= 1e-6 if name in ref["grads"] else torch.zeros_like(expected, dtype=bool)
            for where, atol in ((~noise, 5e-4), (noise, LR * STEPS)):
                torch.testing.assert_close(
                    value[where], expected[where], rtol=1e-4, atol=atol, msg=lambda m: f"rank {rank} {name}: {m}"
                )
        if clip is not None:
            torch.testing.assert_close(torch.tensor(result["norms"]), torch.tensor(ref["norms"]), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------------


def test_tp2_alone_matches_one_process_with_aux_loss() -> None:
    # dp = 1: every rank routes the whole batch, so the full aux loss (balance + z) must match tp = 1
    results = run_ranks(_train, 2, tp=2, aux=0.05)
    _check(results, aux=0.05)
    placements = results[0]["placements"]
    assert "Shard(dim=0)" in placements["encoder_layers.0.self_attn.q_proj.weight"]
    assert "Shard(dim=1)" in placements["encoder_layers.0.self_attn.out_proj.weight"]
    assert "Shard(dim=0)" in placements["src_embed.weight"] and "Shard(dim=0)" in placements["output_proj.weight"]


def test_tp2_ep2_zero3_four_ranks() -> None:
    results = run_ranks(_train, 4, tp=2, ep=2, stage=3)
    _check(results)
    experts = results[0]["placements"]["encoder_layers.1.ffn.experts.w1"]
    assert experts.count("Shard") == 2, experts  # (efsdp x tp ZeRO shard, ep shard)


def test_tp4_four_ranks() -> None:
    _check(run_ranks(_train, 4, tp=4, stage=3))


@pytest.mark.parametrize(("stage", "offload"), [(0, "none"), (1, "none"), (2, "optimizer"), (3, "params")])
def test_tp2_every_zero_stage_and_offload(stage: int, offload: str) -> None:
    _check(run_ranks(_train, 4, tp=2, ep=1, stage=stage, offload=offload))


def test_tp2_ep2_gradient_accumulation() -> None:
    _check(run_ranks(_train, 4, tp=2, ep=2, stage=1, accum=2))


def test_tp2_with_activation_checkpointing() -> None:
    _check(run_ranks(_train, 2, tp=2, stage=3, activation_checkpointing=True))


def test_tp2_ep2_bf16_mixed_stays_close() -> None:
    # bf16 compute cannot match the fp32 reference element by element; the trajectory must stay close.
    ref = _reference(False, 0.0)
    for result in run_ranks(_train, 4, tp=2, ep=2, stage=2, precision="bf16-mixed"):
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref["losses"]), rtol=2e-2, atol=2e-2)
        flat = torch.cat([v.flatten() for v in result["params"].values()])
        ref_flat = torch.cat([ref["params"][n].flatten() for n in result["params"]])
        assert (flat - ref_flat).norm() / ref_flat.norm() < 3e-2


def test_tp2_tied_embeddings_split_over_vocabulary() -> None:
    # The tied table is split over tp (the 2nd mesh dim) and serves as embedding and output projection.
    results = run_ranks(_train, 2, tp=2, tie=True)
    _check(results, tie=True)
    placements = results[0]["placements"]["src_embed.weight"]  # (ZeRO over dp, tp)
    assert placements.endswith(", Shard(dim=0))"), placements


@pytest.mark.parametrize(("world_size", "ep", "stage"), [(4, 2, 3), (4, 1, 0)])
def test_tied_embeddings_with_data_parallel_and_zero(world_size: int, ep: int, stage: int) -> None:
    # FSDP keeps the table and its second user (the tied head) in the root unit.
    _check(run_ranks(_train, world_size, tp=2, ep=ep, stage=stage, tie=True), tie=True)


def test_clipping_norm_over_tp_and_expert_meshes() -> None:
    _check(run_ranks(_train, 4, tp=2, ep=2, stage=2, clip=0.5), clip=0.5)


def _train_with_dropout(rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = MoETransformer(
        _config(dropout=0.2, attention_dropout=0.1, drop_tokens=True, use_rts=True, noisy_gate_policy="jitter")
    )
    torch.manual_seed(100 + rank)  # every rank its own random stream, as without a shared seed
    dims = ParallelDims(world_size, 1, tensor_parallel_size=2, zero_stage=2).resolve(expert_counts(model))
    parallelize(model, dims.build_mesh("cpu"), dims)
    opt = _optimizer(model)
    losses = []
    for batch in _batches(2):
        loss, _ = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "norm": _full(model.encoder_layers[0].ffn_norm.weight)}


def test_tp_ranks_share_dropout_and_router_randomness() -> None:
    # Dropout, router jitter and random token selection on replicated activations must draw the same
    # numbers on both tp ranks, or the replicas (and their replicated weights) drift apart.
    first, second = run_ranks(_train_with_dropout, 2)
    assert first["losses"] == second["losses"]
    assert torch.equal(first["norm"], second["norm"])


# --------------------------------------------------------------------------------------------------
# generation with key/value caches on local heads
# --------------------------------------------------------------------------------------------------


def _all_done(local_done: bool) -> bool:
    flag = torch.tensor([0.0 if local_done else 1.0])
    dist.all_reduce(flag)
    return float(flag) == 0.0


def _greedy(rank: int, world_size: int, tie: bool) -> tuple[list, list]:
    model = _model(tie=tie).eval()
    reference = _model(tie=tie).eval()
    dims = ParallelDims(world_size, 1, tensor_parallel_size=2, zero_stage=3).resolve(expert_counts(model))
    parallelize(model, dims.build_mesh("cpu"), dims)
    src = torch.randint(5, VOCAB, (3, 6), generator=torch.Generator().manual_seed(5))
    src[0, 4:] = 0
    mask = src == 0
    ids = dict(bos_id=2, eos_id=3, pad_id=0, max_len_a=1.0, max_len_b=4)
    return greedy_decode(model, src, mask, sync_done=_all_done, **ids), greedy_decode(reference, src, mask, **ids)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_greedy_decode_on_tp2_equals_unsharded(tie: bool) -> None:
    for got, expected in run_ranks(_greedy, 2, tie):
        assert got == expected


# --------------------------------------------------------------------------------------------------
# validation and plan
# --------------------------------------------------------------------------------------------------


def test_plan_names_attention_ffn_embeddings_and_head() -> None:
    plan = tensor_parallel_plan(_model())
    assert plan["encoder_layers.0.self_attn.k_proj"] == "colwise"
    assert plan["decoder_layers.0.cross_attn.out_proj"] == "rowwise"
    assert plan["encoder_layers.0.ffn.fc1"] == "colwise" and plan["encoder_layers.0.ffn.fc2"] == "rowwise"
    assert "encoder_layers.0.ffn.fc3" not in plan  # ffn kind has no fc3
    assert plan["src_embed"] == "embedding" and plan["output_proj"] == "head"
    assert not any(k.startswith("encoder_layers.1.ffn") for k in plan)  # MoE layer: experts are not split
    tied = tensor_parallel_plan(_model(tie=True))
    assert tied["src_embed"] == "embedding" and tied["tied_head"] == "tied_head"
    assert "output_proj" not in tied and "tgt_embed" not in tied


def test_row_split_sizes() -> None:
    assert row_split_sizes(7, 2) == [4, 3]
    assert row_split_sizes(1, 4) == [1, 0, 0, 0]
    assert sum(row_split_sizes(0, 2)) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(world_size=4, tensor_parallel_size=3), r"tensor_parallel_size=3 does not divide world_size=4"),
        (dict(world_size=4, tensor_parallel_size=0), r"tensor_parallel_size=0 must be a positive integer"),
        (
            dict(world_size=4, tensor_parallel_size=2, expert_parallel_size=4),
            r"expert_parallel_size=4 does not divide the data-parallel size 2",
        ),
    ],
)
def test_invalid_dims_rejected(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ParallelDims(**kwargs)


def _apply_bad_heads(rank: int, world_size: int) -> str:
    from torch.distributed.device_mesh import init_device_mesh

    model = _model(heads=2)  # 2 heads over tp=4
    mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
    try:
        apply_tensor_parallel(model, mesh)
    except ValueError as err:
        return str(err)
    return "no error"


def test_tp_not_dividing_heads_is_rejected_before_training() -> None:
    messages = run_ranks(_apply_bad_heads, 4)
    assert all("does not divide num_heads=2" in m for m in messages), messages[0]


# --------------------------------------------------------------------------------------------------
# checkpoints reshard across tp sizes
# --------------------------------------------------------------------------------------------------


def _parallel_model(
    world_size: int, tp: int, seed: int = 0, tie: bool = False
) -> tuple[MoETransformer, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = MoETransformer(_config(tie=tie))
    dims = ParallelDims(world_size, 1, tensor_parallel_size=tp, zero_stage=3).resolve(expert_counts(model))
    parallelize(model, dims.build_mesh("cpu"), dims)
    return model, _optimizer(model)


def _full_optim(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    from lightning_moe import checkpoint as ckpt

    state = ckpt.optimizer_state_dict(model, opt, full=False)["state"]
    return {n: {k: _full(torch.as_tensor(v)) for k, v in entries.items()} for n, entries in state.items()}


def _save_tp2(rank: int, world_size: int, folder: str, file: str, tie: bool) -> dict[str, Any]:
    from lightning_moe import checkpoint as ckpt

    model, opt = _parallel_model(world_size, tp=2, tie=tie)
    loss, _ = model.loss(_batches(1)[0])
    loss.backward()
    opt.step()
    opt.zero_grad()
    sharded = {
        "state_dict": ckpt.model_state_dict(model, full=False),
        "optimizer_states": [ckpt.optimizer_state_dict(model, opt, full=False)],
        "global_step": 1,
    }
    ckpt.save_checkpoint(sharded, folder, distributed=True)
    full = {
        "state_dict": ckpt.model_state_dict(model, full=True),
        "optimizer_states": [ckpt.optimizer_state_dict(model, opt, full=True)],
        "global_step": 1,
    }
    ckpt.save_checkpoint(full, file, distributed=False)
    return {"params": _full_params(model), "optim": _full_optim(model, opt)}


def _load(rank: int, world_size: int, path: str, tp: int, tie: bool) -> dict[str, Any]:
    from lightning_moe import checkpoint as ckpt

    model, opt = _parallel_model(world_size, tp=tp, seed=1, tie=tie)  # other weights than the saved ones
    meta = ckpt.load_checkpoint(path, model, [opt])
    return {"params": _full_params(model), "optim": _full_optim(model, opt), "step": meta["global_step"]}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def saved_tp2(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, dict, bool]:
    """A tp=2 checkpoint after one step: (DCP folder, full file, saved full state, tied embeddings)."""
    tie = request.param
    root = tmp_path_factory.mktemp("tp_ckpt")
    folder, file = str(root / "tp2.ckpt"), str(root / "tp2-full.ckpt")
    saved = run_ranks(_save_tp2, 2, folder, file, tie)[0]
    return folder, file, saved, tie


def _assert_same_state(saved: dict[str, Any], loaded: dict[str, Any]) -> None:
    assert loaded["params"].keys() == saved["params"].keys()
    for name, value in saved["params"].items():
        torch.testing.assert_close(loaded["params"][name], value, rtol=0, atol=0, msg=name)
    assert loaded["optim"].keys() == saved["optim"].keys() and saved["optim"]
    for name, entries in saved["optim"].items():
        for key, value in entries.items():
            torch.testing.assert_close(loaded["optim"][name][key], value, rtol=0, atol=0, msg=f"{name}.{key}")


@pytest.mark.parametrize(("world_size", "tp"), [(1, 1), (4, 4)])
def test_tp2_checkpoint_folder_loads_at_other_tp_sizes(saved_tp2: tuple, world_size: int, tp: int) -> None:
    folder, _, saved, tie = saved_tp2
    for loaded in run_ranks(_load, world_size, folder, tp, tie):
        assert loaded["step"] == 1
        _assert_same_state(saved, loaded)


def test_tp2_full_file_and_consolidated_folder_hold_plain_full_tensors(saved_tp2: tuple, tmp_path) -> None:
    from lightning_moe import checkpoint as ckpt

    folder, file, saved, tie = saved_tp2
    consolidated = tmp_path / "consolidated.pt"
    ckpt.consolidate(folder, consolidated)
    for path in (file, consolidated):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert state.keys() == saved["params"].keys()
        for name, value in saved["params"].items():
            assert type(state[name]) is torch.Tensor, name  # plain, not a DTensor
            torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    _assert_same_state(saved, run_ranks(_load, 1, file, 1, tie)[0])


# --------------------------------------------------------------------------------------------------
# Lightning: Trainer(strategy=MoEZeroStrategy(tensor_parallel_size=2))
# --------------------------------------------------------------------------------------------------


def _fit(rank: int, world_size: int, strategy_kwargs: dict[str, Any]) -> dict[str, Any]:
    from lightning_moe.strategy import MoEZeroStrategy
    from tests.distributed.test_strategy_models import TinyMoEModule, full_state, make_trainer

    torch.manual_seed(0)
    module = TinyMoEModule(z_loss_coef=0.01)
    strategy = MoEZeroStrategy(**strategy_kwargs)
    trainer = make_trainer(world_size, strategy, max_steps=3)
    trainer.fit(module)
    return {
        "losses": module.losses,
        "state": full_state(module),
        "sampler": trainer.distributed_sampler_kwargs,
        "tp": strategy.tensor_parallel_size,
    }


def test_trainer_fit_tp2_ep2_zero3_on_four_ranks() -> None:
    from tests.distributed.test_strategy_models import TinyMoEModule, reference_run

    results = run_ranks(_fit, 4, dict(tensor_parallel_size=2, expert_parallel_size=2, zero_stage=3), timeout=180)
    torch.manual_seed(0)
    module = TinyMoEModule(z_loss_coef=0.01)
    ref_losses = reference_run(module, 2, 3)  # 2 data-parallel ranks
    ref_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for rank, result in enumerate(results):
        assert result["tp"] == 2
        assert result["sampler"] == {"num_replicas": 2, "rank": rank // 2}  # tp ranks read the same batch
        for name, ref in ref_state.items():
            torch.testing.assert_close(result["state"][name], ref, rtol=1e-4, atol=2e-5, msg=f"rank {rank}: {name}")
    # the two tp ranks of a data-parallel rank saw the same batches
    assert results[0]["losses"] == results[1]["losses"] and results[2]["losses"] == results[3]["losses"]
    mean = [(a + b) / 2 for a, b in zip(results[0]["losses"], results[2]["losses"])]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)


def test_strategy_rejects_bad_tensor_parallel_size_before_training() -> None:
    from lightning_moe.strategy import MoEZeroStrategy
    from tests.distributed.test_strategy_models import make_trainer

    with pytest.raises(ValueError, match="tensor_parallel_size=0 must be a positive integer dividing the world size"):
        MoEZeroStrategy(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide world_size=2"):
        make_trainer(2, MoEZeroStrategy(tensor_parallel_size=3))
