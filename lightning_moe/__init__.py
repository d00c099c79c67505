"""lightning_moe: Mixture-of-Experts training for PyTorch Lightning.

``import lightning_moe`` registers the ``moe_zero`` strategy names with Lightning.
"""

from lightning_moe.moe import MoE, MoEOutput, MoEStats

__version__ = "0.1.0"

__all__ = ["MoE", "MoEOutput", "MoEStats", "__version__"]
