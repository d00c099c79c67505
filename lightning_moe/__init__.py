"""lightning_moe: Mixture-of-Experts training for PyTorch Lightning.

``import lightning_moe`` registers the ``moe_zero`` strategy names with Lightning.
"""

from lightning_moe.moe import MoE, MoEOutput, MoEStats

__version__ = "0.1.0"

__all__ = ["MoE", "MoEOutput", "MoEStats", "__version__"]

# Registration: `Trainer(strategy="moe_zero")` (and the presets) resolve once this package is imported.
# Lightning's own registry scan only sees its own classes, so a third-party strategy registers itself here.
from lightning_moe.strategy import register_strategies as _register_strategies  # noqa: E402

_register_strategies()
