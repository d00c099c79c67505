"""The package root stays light: the MoE layer imports no Lightning, and the strategy names still register."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_importing_the_moe_layer_does_not_import_lightning() -> None:
    _run(
        "import sys, lightning_moe.moe\n"
        "loaded = [m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'lightning_fabric', 'pytorch_lightning'))]\n"
        "assert not loaded, loaded\n"
    )


@pytest.mark.parametrize("lightning_first", [True, False])
def test_strategy_names_register_whichever_is_imported_first(lightning_first: bool) -> None:
    imports = ["import lightning.pytorch", "import lightning_moe"]
    if not lightning_first:
        imports.reverse()
    _run(
        "\n".join(imports) + "\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "from lightning_moe.strategy import STRATEGY_PRESETS, MoEZeroStrategy\n"
        "for name in STRATEGY_PRESETS:\n"
        "    assert StrategyRegistry[name]['strategy'] is MoEZeroStrategy, name\n"
        "from lightning.pytorch import Trainer\n"
        "trainer = Trainer(strategy='moe_zero', accelerator='cpu', devices=2, logger=False)\n"
        "assert isinstance(trainer.strategy, MoEZeroStrategy)\n"
    )


def test_registration_waits_for_lightning_and_leaves_its_loader_alone() -> None:
    _run(
        "import sys, lightning_moe\n"
        "assert 'lightning_moe.strategy' not in sys.modules and 'lightning.pytorch' not in sys.modules\n"
        "import lightning.pytorch as lp\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "assert 'moe_zero' in StrategyRegistry\n"
        "assert type(lp.__loader__).__module__ != 'lightning_moe' and lp.__spec__.loader is lp.__loader__\n"
    )


def test_strategy_class_is_exported_lazily_from_the_root() -> None:
    _run(
        "import sys, lightning_moe\n"
        "assert 'lightning_moe.strategy' not in sys.modules\n"
        "from lightning_moe import MoEZeroStrategy\n"
        "from lightning_moe.strategy import MoEZeroStrategy as direct\n"
        "assert MoEZeroStrategy is direct and 'MoEZeroStrategy' in lightning_moe.__all__\n"
    )
