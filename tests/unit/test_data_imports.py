"""The data package and the tasks do not import each other in a circle: ``lightning_moe.data`` holds the
lower layers only, and the data module (which builds on the tasks) is imported from its own module."""

from __future__ import annotations

import subprocess
import sys

import lightning_moe.data


def test_data_package_does_not_hide_the_data_module() -> None:
    assert not hasattr(lightning_moe.data, "__getattr__")  # no lazy re-export hiding an import cycle
    for name in ("MultitaskDataModule", "DataConfig", "DATA_PRESETS", "get_data_preset"):
        assert name not in lightning_moe.data.__all__


def test_each_layer_imports_first_in_a_fresh_interpreter() -> None:
    script = (
        "import sys\n"
        "import lightning_moe.data\n"
        "assert 'lightning_moe.tasks' not in sys.modules, 'lightning_moe.data imports the tasks'\n"
        "assert 'lightning_moe.data.datamodule' not in sys.modules, 'lightning_moe.data imports the data module'\n"
        "import lightning_moe.tasks\n"
        "assert 'lightning_moe.data.datamodule' not in sys.modules, 'the tasks import the data module'\n"
        "from lightning_moe.data.datamodule import MultitaskDataModule\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
