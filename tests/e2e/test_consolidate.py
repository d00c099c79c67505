"""A consolidated checkpoint of a tiny training run loads with ``torch.load(weights_only=True)`` and with
``MultitaskTranslationModule.load_from_checkpoint``, from a sharded folder and from a Lightning file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_moe import checkpoint as ckpt
from lightning_moe.module import MultitaskTranslationModule
from tests.e2e.test_cli import TINY, _run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "strategy",
    [["strategy=moe_zero_stage3", "trainer.devices=1"], []],
    ids=["sharded-folder", "lightning-file"],
)
def test_consolidated_checkpoint_loads_with_torch_and_lightning(tmp_path: Path, strategy: list[str]) -> None:
    run_dir = tmp_path / "run"
    _run(
        [
            "lightning_moe.train",
            *TINY,
            *strategy,
            f"hydra.run.dir={run_dir}",
            "trainer.max_steps=1",
            "checkpoint.every_n_train_steps=1",
            "test_after_fit=false",
        ],
        tmp_path,
    )
    source = run_dir / "checkpoints" / "step-000001.ckpt"
    assert source.is_dir() == bool(strategy)
    out = tmp_path / "consolidated.pt"
    assert ckpt.consolidate_main(["consolidate", str(source), str(out)]) == 0

    plain = torch.load(out, weights_only=True)
    assert plain["global_step"] == 1 and isinstance(plain["hyper_parameters"], dict)

    module = MultitaskTranslationModule.load_from_checkpoint(out)  # torch's default: weights_only=True
    assert dict(module.hparams) == plain["hyper_parameters"]
    assert module.tokenizer is not None  # restored by the module's on_load_checkpoint

    # the reference weights, read without consolidation: DCP's resharding load, or the file as it is
    if source.is_dir():
        reference_module = MultitaskTranslationModule(**plain["hyper_parameters"])
        ckpt.load_checkpoint(source, reference_module)
        reference = reference_module.state_dict()
    else:
        reference = torch.load(source, weights_only=True)["state_dict"]
    loaded = module.state_dict()
    assert loaded.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)
