"""lightning_moe: Mixture-of-Experts training for PyTorch Lightning.

``import lightning_moe`` registers the ``moe_zero`` strategy names with Lightning's ``StrategyRegistry``
without importing Lightning itself: at once when ``lightning.pytorch`` is already imported, else right after
it is (so that ``import lightning_moe.moe``, the plain tensor layer, stays free of Lightning).
``MoEZeroStrategy`` is importable from here; it is loaded on first use.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

from lightning_moe.moe import MoE, MoEOutput, MoEStats

__version__ = "0.1.0"

__all__ = ["MoE", "MoEOutput", "MoEStats", "MoEZeroStrategy", "__version__"]

_LIGHTNING = "lightning.pytorch"
"""The module whose import makes the strategy registry usable (it imports its ``strategies`` package)."""


def __getattr__(name: str) -> Any:
    if name == "MoEZeroStrategy":  # lazily: the strategy imports Lightning
        from lightning_moe.strategy import MoEZeroStrategy

        return MoEZeroStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_strategies() -> None:
    strategy = sys.modules.get("lightning_moe.strategy")
    if strategy is not None and getattr(strategy.__spec__, "_initializing", False):
        return  # Lightning is being imported by the strategy module, which registers itself once loaded
    from lightning_moe.strategy import register_strategies

    register_strategies()


class _RegisterAfterExec(importlib.abc.Loader):
    """Runs ``lightning.pytorch``'s own loader, then the registration; anything else goes to that loader."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader  # leave no trace of this wrapper
        _register_strategies()


class _RegisterOnLightningImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: when ``lightning.pytorch`` is first imported, register once it has loaded."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _LIGHTNING:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def _arrange_registration() -> None:
    loaded = sys.modules.get(_LIGHTNING)
    if loaded is not None and not getattr(getattr(loaded, "__spec__", None), "_initializing", False):
        _register_strategies()
    elif not any(isinstance(finder, _RegisterOnLightningImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnLightningImport())


_arrange_registration()
