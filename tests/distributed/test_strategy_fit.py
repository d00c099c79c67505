"""``Trainer.fit`` under ``MoEZeroStrategy`` on 2 gloo ranks against an independent single-process loop.

The torch-level ep x stage matrix is covered by the parallel tests; these check the Lightning integration:
the distributed sampler, gradient accumulation (no-sync micro-batches), clipping by norm and by value,
``self.log(sync_dist=True)``, MoE aux losses, precision, offload and the ``configure_model`` path.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_moe.strategy import MoEZeroStrategy
from tests.distributed.harness import RankError, run_ranks
from tests.distributed.test_strategy_models import TinyMoEModule, full_state, make_trainer, reference_run

pytestmark = pytest.mark.distributed

WORLD = 2
AUX = dict(aux_loss_coef=0.05, z_loss_coef=0.01)


def _fit(
    rank: int,
    world_size: int,
    strategy_kwargs: dict[str, Any],
    module_kwargs: dict[str, Any],
    trainer_kwargs: dict[str, Any],
) -> dict[str, Any]:
    torch.manual_seed(0)
    module = TinyMoEModule(**module_kwargs)
    strategy = MoEZeroStrategy(**strategy_kwargs)
    trainer = make_trainer(world_size, strategy, **trainer_kwargs)
    trainer.fit(module)
    return {
        "losses": module.losses,
        "state": full_state(module),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "global_step": trainer.global_step,
        "ep": strategy.expert_parallel_size,
        "param_dtypes": sorted({str(p.dtype) for p in module.parameters()}),
        "update": [_update_kind(g) for g in trainer.optimizers[0].param_groups],
    }


def _update_kind(group: dict[str, Any]) -> str:
    return "fused" if group.get("fused") else "foreach" if group.get("foreach") else "default"


def _reference(module_kwargs: dict[str, Any], steps: int, **kwargs: Any) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    module = TinyMoEModule(**module_kwargs)
    losses = reference_run(module, WORLD, steps, **kwargs)
    return losses, {k: v.detach().clone() for k, v in module.state_dict().items()}


def _mean_over_ranks(results: list[dict[str, Any]]) -> list[float]:
    per_rank = [r["losses"] for r in results]
    return [sum(vals) / len(vals) for vals in zip(*per_rank)]


def _assert_matches(results: list[dict[str, Any]], ref_losses: list[float], ref_state: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(torch.tensor(_mean_over_ranks(results)), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    for rank, result in enumerate(results):
        assert result["state"].keys() == ref_state.keys()
        for name, ref in ref_state.items():
            torch.testing.assert_close(result["state"][name], ref, rtol=1e-4, atol=2e-5, msg=f"rank {rank}: {name}")


def _assert_logging_synced(results: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(results):
        assert result["metrics"]["rank_synced"] == pytest.approx(sum(range(WORLD)) / WORLD)
        assert result["metrics"]["rank_local"] == float(rank)  # without sync_dist every rank keeps its own


@pytest.mark.parametrize(
    ("zero_stage", "ep"),
    [(0, 1), (1, 2), (3, 2), (2, "auto")],
    ids=["stage0-ep1", "stage1-ep2", "stage3-ep2", "stage2-auto"],
)
def test_fit_matches_single_process_with_aux_losses(zero_stage: int, ep: Any) -> None:
    module_kwargs = dict(AUX, n_samples=16)
    results = run_ranks(
        _fit, WORLD, dict(zero_stage=zero_stage, expert_parallel_size=ep), module_kwargs, dict(max_steps=3), timeout=120
    )
    ref_losses, ref_state = _reference(module_kwargs, steps=3)
    assert all(r["global_step"] == 3 for r in results)
    assert results[0]["ep"] == (2 if ep == "auto" else ep)
    # DTensor parameters: the fused AdamW update (one dispatch per step); at stage 0 with ep=1 DDP keeps plain
    # tensors and torch's own choice
    assert results[0]["update"] == (["default"] if zero_stage == 0 and ep == 1 else ["fused"])
    _assert_matches(results, ref_losses, ref_state)
    _assert_logging_synced(results)


@pytest.mark.parametrize(
    ("zero_stage", "ep", "algorithm", "clip_val"),
    [(1, 2, "norm", 0.05), (2, 1, "value", 0.002)],
    ids=["stage1-ep2-norm", "stage2-ep1-value"],
)
def test_accumulation_and_clipping_match_single_process(
    zero_stage: int, ep: int, algorithm: str, clip_val: float
) -> None:
    module_kwargs = dict(AUX, n_samples=16)
    trainer_kwargs = dict(
        max_steps=2, accumulate_grad_batches=2, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm
    )
    results = run_ranks(
        _fit, WORLD, dict(zero_stage=zero_stage, expert_parallel_size=ep), module_kwargs, trainer_kwargs, timeout=120
    )
    ref_losses, ref_state = _reference(
        module_kwargs, steps=2, accumulate=2, clip_val=clip_val, clip_algorithm=algorithm
    )
    # the clipping is active: without it the reference ends elsewhere
    _, unclipped_state = _reference(module_kwargs, steps=2, accumulate=2)
    assert any(not torch.allclose(unclipped_state[k], ref_state[k], atol=1e-4) for k in ref_state)
    assert all(r["global_step"] == 2 for r in results)
    assert len(results[0]["losses"]) == 4  # 2 optimizer steps x 2 micro-batches
    _assert_matches(results, ref_losses, ref_state)


@pytest.mark.parametrize("offload", ["optimizer", "params"])
def test_offload_matches_single_process(offload: str) -> None:
    stage = 3 if offload == "params" else 2
    module_kwargs = dict(n_samples=16)
    results = run_ranks(
        _fit,
        WORLD,
        dict(zero_stage=stage, expert_parallel_size=2, offload=offload),
        module_kwargs,
        dict(max_steps=2),
        timeout=120,
    )
    ref_losses, ref_state = _reference(module_kwargs, steps=2)
    _assert_matches(results, ref_losses, ref_state)


def test_activation_checkpointing_matches_single_process() -> None:
    module_kwargs = dict(AUX, n_samples=16)
    results = run_ranks(
        _fit,
        WORLD,
        dict(zero_stage=3, expert_parallel_size=2, activation_checkpointing=True),
        module_kwargs,
        dict(max_steps=2),
        timeout=120,
    )
    ref_losses, ref_state = _reference(module_kwargs, steps=2)
    _assert_matches(results, ref_losses, ref_state)


def _fit_bf16(rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    module = TinyMoEModule(n_samples=16)
    seen: list[torch.dtype] = []
    module.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(out[0].dtype))
    trainer = make_trainer(
        world_size, MoEZeroStrategy(zero_stage=2, expert_parallel_size=2), max_steps=2, precision="bf16-mixed"
    )
    trainer.fit(module)
    return {
        "losses": module.losses,
        "compute_dtypes": sorted({str(d) for d in seen}),
        "param_dtypes": sorted({str(p.dtype) for p in module.parameters()}),
    }


def test_bf16_mixed_computes_in_bf16_with_fp32_parameters() -> None:
    results = run_ranks(_fit_bf16, WORLD, timeout=120)
    ref_losses, _ = _reference(dict(n_samples=16), steps=2)
    for r in results:
        assert r["compute_dtypes"] == ["torch.bfloat16"]
        assert r["param_dtypes"] == ["torch.float32"]
    mean = _mean_over_ranks(results)
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(ref_losses), rtol=0, atol=5e-2)
    assert mean != ref_losses  # really ran in bf16


def test_bf16_true_keeps_parameters_in_bf16() -> None:
    results = run_ranks(
        _fit,
        WORLD,
        dict(zero_stage=3, expert_parallel_size=2),
        dict(n_samples=16),
        dict(max_steps=2, precision="bf16-true"),
        timeout=120,
    )
    for r in results:
        assert r["param_dtypes"] == ["torch.bfloat16"]
        assert all(torch.isfinite(torch.tensor(r["losses"])))


class _Ran(TinyMoEModule):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        raise AssertionError("training must not start with a bad configuration")


def _fit_bad_ep(rank: int, world_size: int) -> None:
    module = _Ran(num_experts=3)
    make_trainer(world_size, MoEZeroStrategy(expert_parallel_size=2)).fit(module)


def test_expert_parallel_size_not_dividing_expert_count_fails_before_training() -> None:
    with pytest.raises(RankError) as info:
        run_ranks(_fit_bad_ep, WORLD, timeout=60)
    message = str(info.value)
    assert "ValueError" in message and "expert_parallel_size=2" in message and "num_experts=3" in message
    assert "training must not start" not in message


class _LateModule(TinyMoEModule):
    """Builds its MoE blocks in ``configure_model`` and records the mesh it saw there."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # keep the blocks (same initial weights as the reference) out of the module tree until configure_model
        object.__setattr__(self, "_late_blocks", self.blocks)
        self.blocks = nn.ModuleList()
        self.mesh_in_configure_model: Any = "not called"

    def configure_model(self) -> None:
        mesh = self.device_mesh
        self.mesh_in_configure_model = None if mesh is None else dict(zip(mesh.mesh_dim_names, mesh.shape))
        if len(self.blocks) == 0:
            self.blocks = self._late_blocks
        del self._late_blocks


def _fit_late(rank: int, world_size: int, ep: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    module = _LateModule(n_samples=16)
    strategy = MoEZeroStrategy(zero_stage=3, expert_parallel_size=ep)
    make_trainer(world_size, strategy, max_steps=2).fit(module)
    return {
        "mesh": module.mesh_in_configure_model,
        "ep": strategy.expert_parallel_size,
        "losses": module.losses,
        "state": full_state(module),
    }


@pytest.mark.parametrize("ep", [2, "auto"])
def test_model_built_in_configure_model(ep: Any) -> None:
    results = run_ranks(_fit_late, WORLD, ep, timeout=120)
    if ep == "auto":  # the expert counts are only known after configure_model
        assert results[0]["mesh"] is None
    else:
        assert results[0]["mesh"] == {"efsdp": 1, "ep": 2, "tp": 1}
    assert results[0]["ep"] == 2
    ref_losses, ref_state = _reference(dict(n_samples=16), steps=2)
    _assert_matches(results, ref_losses, ref_state)


class _PreSharded(TinyMoEModule):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.out)


def _fit_presharded(rank: int, world_size: int) -> None:
    make_trainer(world_size, MoEZeroStrategy()).fit(_PreSharded())


def test_model_sharded_by_the_user_is_rejected() -> None:
    with pytest.raises(RankError, match="already sharded"):
        run_ranks(_fit_presharded, WORLD, timeout=60)


class _WithEval(TinyMoEModule):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss(x, y), sync_dist=True)
        self.log("val_rank", float(self.global_rank), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", self.loss(x, y), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        logits, _ = self(batch[0])
        return logits

    def val_dataloader(self) -> Any:
        return self.train_dataloader()

    def test_dataloader(self) -> Any:
        return self.train_dataloader()

    def predict_dataloader(self) -> Any:
        return self.train_dataloader()


def _fit_then_evaluate(rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    module = _WithEval(n_samples=8)
    trainer = make_trainer(
        world_size,
        MoEZeroStrategy(zero_stage=3, expert_parallel_size=2),
        max_steps=2,
        max_epochs=1,
        limit_val_batches=2,
    )
    trainer.fit(module)
    after_fit = full_state(module)
    val = trainer.validate(module, verbose=False)[0]
    test = trainer.test(module, verbose=False)[0]
    predictions = trainer.predict(module)
    return {
        "val": val,
        "test": test,
        "n_predictions": sum(p.shape[0] for p in predictions),
        "unchanged": all(torch.equal(v, full_state(module)[k]) for k, v in after_fit.items()),
    }


def test_validate_test_predict_after_fit_reuse_the_parallel_model() -> None:
    results = run_ranks(_fit_then_evaluate, WORLD, timeout=120)
    for r in results:
        assert r["unchanged"]
        assert r["val"]["val_rank"] == pytest.approx(0.5)
        assert r["val"]["val_loss"] == pytest.approx(results[0]["val"]["val_loss"])  # synced: one value
        assert r["test"]["test_loss"] == pytest.approx(r["val"]["val_loss"])  # same data, same weights
        assert r["n_predictions"] == 4  # each rank predicts its half of the 8 samples


def _fit_meta_init(rank: int, world_size: int) -> dict[str, Any]:
    trainer = make_trainer(world_size, MoEZeroStrategy(zero_stage=3, expert_parallel_size=2), max_steps=2)
    with trainer.init_module(empty_init=True):
        module = TinyMoEModule(n_samples=16)
    meta_before = all(p.is_meta for p in module.parameters())
    trainer.fit(module)
    state = full_state(module)
    return {
        "meta_before": meta_before,
        "finite": all(torch.isfinite(v).all() for v in state.values()),
        "nonzero": all(v.abs().sum() > 0 for k, v in state.items() if k.endswith("weight") or "experts.w" in k),
        "losses": module.losses,
    }


def test_meta_device_initialisation_is_materialised_after_sharding() -> None:
    results = run_ranks(_fit_meta_init, WORLD, timeout=120)
    for r in results:
        assert r["meta_before"] and r["finite"] and r["nonzero"]
        assert len(r["losses"]) == 2


def _count_reduce_scatters(rank: int, world_size: int, zero_stage: int) -> int:
    """Gradient reduce-scatters issued by FSDP2 during 2 optimizer steps of 2 micro-batches each."""
    import torch.distributed as dist

    calls = [0]
    # FSDP2 reduces through one of these, depending on the torch version; both are looked up at call time
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        real = getattr(dist, name, None)
        if real is None:
            continue

        def counting(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            calls[0] += 1
            return _real(*args, **kwargs)

        setattr(dist, name, counting)
    torch.manual_seed(0)
    trainer = make_trainer(
        world_size,
        MoEZeroStrategy(zero_stage=zero_stage, expert_parallel_size=2),
        max_steps=2,
        accumulate_grad_batches=2,
    )
    trainer.fit(TinyMoEModule(n_samples=16))
    return calls[0]


def test_stage1_reduces_gradients_once_per_optimizer_step() -> None:
    stage1 = run_ranks(_count_reduce_scatters, WORLD, 1, timeout=120)
    stage2 = run_ranks(_count_reduce_scatters, WORLD, 2, timeout=120)
    # stage 2 reduce-scatters after every micro-batch, stage 1 only after the last one of each step
    assert stage1[0] > 0 and stage2[0] == 2 * stage1[0]
