"""Every package the code imports is declared, and the strategy / MoE layer need only torch and Lightning.

A package that is imported but only arrives through another one (or through the ``dev`` extra) works on
the developer's machine and breaks a newcomer's install; these tests read the imports from the source.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = [ROOT / "lightning_moe", ROOT / "tasks", ROOT / "conf"]
CORE_PATHS = ["lightning_moe/strategy.py", "lightning_moe/parallel", "lightning_moe/moe", "lightning_moe/checkpoint"]
"""The parts a user of ``Trainer(strategy="moe_zero")`` and ``MoE`` imports without the translator."""
TRANSLATOR_ONLY = ["hydra", "omegaconf", "sentencepiece", "sacrebleu", "tensorboard"]
HF_EXTRA_FILES = {"lightning_moe/parallel/hf_moe.py", "lightning_moe/hf.py"}
"""The only core files that import the ``hf`` extra (transformers), lazily, inside functions."""


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> tuple[set[str], set[str]]:
    """(core dependencies, core + translator and hf extras), as normalised distribution names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    optional = {_requirement_name(r) for name in ("translator", "hf") for r in extras[name]}
    return core, core | optional


def _third_party_imports(paths: list[Path]) -> dict[str, set[str]]:
    """Top-level module name -> files importing it, for absolute imports outside the standard library."""
    found: dict[str, set[str]] = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(path.rglob("*.py"))
        for file in files:
            for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("lightning_moe", "__future__"):
                        continue
                    found.setdefault(top, set()).add(str(file.relative_to(ROOT)))
    return found


def _distribution(module: str) -> str:
    dists = packages_distributions().get(module)
    assert dists, f"module {module!r} is imported but belongs to no installed distribution"
    return dists[0].lower().replace("_", "-")


def test_every_imported_package_is_declared() -> None:
    _, declared = _declared()
    missing = {
        module: sorted(files)
        for module, files in _third_party_imports(PACKAGE_DIRS).items()
        if _distribution(module) not in declared
    }
    assert not missing, f"imported but not declared in pyproject's dependencies or translator extra: {missing}"


def test_core_imports_only_torch_and_lightning() -> None:
    core, _ = _declared()
    paths = [ROOT / p for p in CORE_PATHS if (ROOT / p).exists() or (ROOT / f"{p}.py").exists()]
    paths = [p if p.exists() else p.with_suffix(".py") for p in paths]
    outside = {
        module: sorted(files)
        for module, files in _third_party_imports(paths).items()
        if _distribution(module) not in core and not (module == "transformers" and set(files) <= HF_EXTRA_FILES)
    }
    assert not outside, f"the strategy / MoE layer import packages beyond the core dependencies: {outside}"


def test_strategy_and_layer_run_without_the_translator_packages() -> None:
    """Import and use the strategy and the layer with the translator's packages made unimportable."""
    # (transformers is not blocked: torchmetrics, imported by Lightning, finds it installed and imports it;
    # the static test above keeps this code's imports of it lazy.)
    blocked = ", ".join(repr(name) for name in TRANSLATOR_ONLY)
    script = f"""
import sys
for name in ({blocked},):
    sys.modules[name] = None  # `import name` now raises ImportError; find_spec(name) answers None
import torch
import lightning as L
import lightning_moe
from lightning_moe import MoE, MoEZeroStrategy
from lightning.pytorch.strategies import StrategyRegistry
assert "moe_zero" in StrategyRegistry
layer = MoE(hidden_size=16, num_experts=4, ffn_hidden_size=32, k=2)
out, aux, counts = layer(torch.randn(2, 5, 16))
(out.sum() + aux).backward()
strategy = MoEZeroStrategy(expert_parallel_size=1, zero_stage=2)
print("ok", type(strategy).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok MoEZeroStrategy" in result.stdout


def test_every_package_folder_is_shipped() -> None:
    """A non-editable install ships only the packages pyproject lists: a new sub-package must be listed."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    installed_name = {"lightning_moe": "lightning_moe", "tasks": "lightning_moe.tasks", "conf": "lightning_moe.conf"}
    found = set()
    for top, name in installed_name.items():
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *parts)))
    assert found <= listed, f"packages missing from [tool.setuptools] packages: {sorted(found - listed)}"
