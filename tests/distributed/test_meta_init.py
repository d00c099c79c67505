"""A model built on the meta device and materialised after sharding starts from the weights one process gives.

Reference: one process, the same meta-built model, ``to_empty`` and the same init hooks from the same seed.
Before :mod:`lightning_moe.parallel.init`, random fills of CPU DTensor shards drew every shard from the same
generator state (all experts of a sharded ``[E, ...]`` weight equal), and Lightning's materialisation called
``reset_parameters`` only, so a model's own ``init_weights`` was lost (``nn.Embedding`` got N(0, 1)).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe.models import MoETransformer
from lightning_moe.parallel import ParallelDims, expert_counts, parallelize
from lightning_moe.parallel.init import has_meta_tensors, materialize_meta_model
from lightning_moe.strategy import MoEZeroStrategy
from tests.distributed.harness import run_ranks
from tests.distributed.test_strategy_models import TinyMoEModule, full_state, make_trainer
from tests.distributed.tiny_moe import TinyMoEModel
from tests.small_models import small_config

pytestmark = pytest.mark.distributed

EMBED_STD = 0.02


class _OwnInitModel(TinyMoEModel):
    """TinyMoEModel with its own ``init_weights``: a small-std embedding, then every submodule's default."""

    def init_weights(self) -> None:
        nn.init.normal_(self.embed.weight, std=EMBED_STD)
        for module in self.modules():
            if module is not self and module is not self.embed and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()


def _full(model: nn.Module) -> dict[str, Tensor]:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _reference(model_cls: type) -> dict[str, Tensor]:
    with torch.device("meta"):
        model = model_cls(num_experts=8)
    torch.manual_seed(0)
    materialize_meta_model(model, torch.device("cpu"))
    return _full(model)


def _materialise_sharded(rank: int, world_size: int, ep: int, stage: int, model_cls: type) -> dict[str, Any]:
    with torch.device("meta"):
        model = model_cls(num_experts=8)
    dims = ParallelDims(world_size, ep, zero_stage=stage).resolve(expert_counts(model))
    parallelize(model, dims.build_mesh("cpu"), dims)
    torch.manual_seed(rank)  # ranks disagree: rank 0's state must win
    materialize_meta_model(model, torch.device("cpu"))
    return {"meta_left": has_meta_tensors(model), "params": _full(model)}


@pytest.mark.parametrize(
    ("world_size", "ep", "stage"),
    [(4, 2, 3), (4, 4, 1), (2, 2, 0), (2, 1, 0), (2, 1, 2)],
    ids=["ep2-stage3", "ep4-stage1", "ep2-stage0", "ep1-stage0-ddp", "ep1-stage2"],
)
@pytest.mark.parametrize("model_cls", [TinyMoEModel, _OwnInitModel], ids=["reset_parameters", "init_weights"])
def test_sharded_materialisation_equals_one_process(world_size: int, ep: int, stage: int, model_cls: type) -> None:
    ref = _reference(model_cls)
    for rank, result in enumerate(run_ranks(_materialise_sharded, world_size, ep, stage, model_cls)):
        assert not result["meta_left"]
        assert result["params"].keys() == ref.keys()
        for name, value in result["params"].items():
            torch.testing.assert_close(value, ref[name], rtol=0, atol=0, msg=lambda m: f"rank {rank} {name}: {m}")


def test_init_weights_hook_replaces_reset_parameters() -> None:
    params = _reference(_OwnInitModel)
    assert params["embed.weight"].std() == pytest.approx(EMBED_STD, rel=0.2)  # not nn.Embedding's N(0, 1)
    experts = [v for n, v in params.items() if n.endswith("experts.w1")] or [
        v for n, v in params.items() if ".experts." in n
    ]
    assert not torch.equal(experts[0][0], experts[0][1])  # experts differ from one another


def test_module_without_any_init_fails_naming_it() -> None:
    class NoInit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.empty(3))

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(2, 3), NoInit())
    with pytest.raises(ValueError, match=r"\['NoInit'\].*reset_parameters.*init_weights"):
        materialize_meta_model(model, torch.device("cpu"))


class _OwnInitModule(TinyMoEModule):
    """The strategy's LightningModule with a root ``init_weights`` hook."""

    def init_weights(self) -> None:
        nn.init.normal_(self.inp.weight, std=EMBED_STD)
        nn.init.zeros_(self.inp.bias)
        for module in self.modules():
            if module is not self and module is not self.inp and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()

    def on_fit_start(self) -> None:
        self.initial_state = full_state(self)


def _fit_meta(rank: int, world_size: int, zero_stage: int, ep: int) -> dict[str, Tensor]:
    trainer = make_trainer(world_size, MoEZeroStrategy(zero_stage=zero_stage, expert_parallel_size=ep), max_steps=1)
    torch.manual_seed(0)
    with trainer.init_module(empty_init=True):
        module = _OwnInitModule(n_samples=8)
    trainer.fit(module)
    return module.initial_state


@pytest.mark.parametrize(("zero_stage", "ep"), [(3, 2), (0, 1)])
def test_strategy_materialises_with_the_modules_init_weights(zero_stage: int, ep: int) -> None:
    with torch.device("meta"):
        reference = _OwnInitModule(n_samples=8)
    torch.manual_seed(0)
    materialize_meta_model(reference, torch.device("cpu"))
    expected = {k: v.detach() for k, v in reference.state_dict().items()}
    for state in run_ranks(_fit_meta, 2, zero_stage, ep, timeout=120):
        assert state["inp.weight"].std() == pytest.approx(EMBED_STD, rel=0.3)
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------------
# tensor parallelism: the encoder-decoder transformer, whose plans split attention, FFNs, embeddings, head
# --------------------------------------------------------------------------------------------------


def _transformer(tie: bool) -> MoETransformer:
    config = small_config(48, ffn_hidden_size=32, tie_embeddings=tie, dropout=0.1)  # the preset's dropout
    return MoETransformer(config)


def _transformer_on_meta(tie: bool) -> MoETransformer:
    with torch.device("meta"):
        return _transformer(tie)


def _transformer_reference(tie: bool) -> dict[str, Tensor]:
    model = _transformer_on_meta(tie)
    torch.manual_seed(0)
    materialize_meta_model(model, torch.device("cpu"))
    return _full(model)


def _materialise_tp(rank: int, world_size: int, tp: int, ep: int, stage: int, tie: bool) -> dict[str, Any]:
    model = _transformer_on_meta(tie)
    dims = ParallelDims(world_size, ep, tensor_parallel_size=tp, zero_stage=stage).resolve(expert_counts(model))
    parallelize(model, dims.build_mesh("cpu"), dims)
    torch.manual_seed(rank)  # ranks disagree: rank 0's state must win
    materialize_meta_model(model, torch.device("cpu"))
    split = [n for n, p in model.named_parameters() if isinstance(p, DTensor) and p.placements[-1].is_shard()]
    return {"meta_left": has_meta_tensors(model), "params": _full(model), "split": split}


@pytest.mark.parametrize(
    ("world_size", "tp", "ep", "stage"),
    [(2, 2, 1, 2), (4, 2, 2, 3), (4, 2, 1, 0)],
    ids=["tp2", "tp2-ep2-stage3", "tp2-dp2-stage0"],
)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_tensor_parallel_materialisation_equals_one_process(
    world_size: int, tp: int, ep: int, stage: int, tie: bool
) -> None:
    ref = _transformer_reference(tie)
    for rank, result in enumerate(run_ranks(_materialise_tp, world_size, tp, ep, stage, tie)):
        assert not result["meta_left"]
        assert "encoder_layers.0.self_attn.q_proj.weight" in result["split"] and "src_embed.weight" in result["split"]
        assert result["params"].keys() == ref.keys()
        for name, value in result["params"].items():
            torch.testing.assert_close(value, ref[name], rtol=0, atol=0, msg=lambda m: f"rank {rank} {name}: {m}")


class _TransformerModule(LightningModule):
    """The transformer of the tests above as a LightningModule; records its full weights at fit start."""

    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.model = _transformer(tie)
        gen = torch.Generator().manual_seed(1)
        # explicit device: real data even when built under `Trainer.init_module(empty_init=True)`
        self.src = torch.randint(5, 48, (8, 7), generator=gen, device="cpu")  # [N, S]
        self.tgt = torch.randint(5, 48, (8, 6), generator=gen, device="cpu")  # [N, T]

    def on_fit_start(self) -> None:
        self.initial_state = full_state(self)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        src, tgt = batch
        loss, _ = self.model.loss({"src": src, "tgt_in": tgt, "tgt_out": torch.roll(tgt, -1, 1)})
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.src, self.tgt), batch_size=2)


def _fit_meta_tp(rank: int, world_size: int, tp: int, ep: int, stage: int, tie: bool) -> dict[str, Tensor]:
    strategy = MoEZeroStrategy(tensor_parallel_size=tp, expert_parallel_size=ep, zero_stage=stage)
    trainer = make_trainer(world_size, strategy, max_steps=1)
    torch.manual_seed(0)
    with trainer.init_module(empty_init=True):
        module = _TransformerModule(tie)
    trainer.fit(module)
    return module.initial_state


@pytest.mark.parametrize(
    ("world_size", "tp", "ep", "stage", "tie"),
    [(2, 2, 1, 2, False), (4, 2, 2, 3, True)],
    ids=["tp2-untied", "tp2-ep2-stage3-tied"],
)
def test_strategy_materialises_tensor_parallel_model_as_one_process(
    world_size: int, tp: int, ep: int, stage: int, tie: bool
) -> None:
    reference = _transformer_reference(tie)
    for rank, state in enumerate(run_ranks(_fit_meta_tp, world_size, tp, ep, stage, tie, timeout=180)):
        assert {k.removeprefix("model.") for k in state} == reference.keys()
        for name, value in reference.items():
            torch.testing.assert_close(
                state[f"model.{name}"], value, rtol=0, atol=0, msg=lambda m: f"rank {rank} {name}: {m}"
            )
