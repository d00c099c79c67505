"""Loggers and callbacks of the ``logger`` and ``callbacks`` groups: ``_target_`` nodes built with
``hydra.utils.instantiate``.

Three rules on top of plain instantiation: a logger whose package is missing is a one-line
:class:`ConfigError` saying what to ``pip install`` (checked while validating, before any process
starts), except TensorBoard, the default, which falls back to CSV with one warning; and a resumed run
writes to the TensorBoard/CSV version it wrote before, so its curves continue instead of starting
``version_1`` (the CSV file keeps its earlier rows: Lightning's CSV writer deletes them).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
from pathlib import Path
from typing import Any

from lightning_moe.config.errors import ConfigError

__all__ = ["check_logger_packages", "instantiate_loggers", "instantiate_callbacks", "LOGGER_PACKAGES"]

log = logging.getLogger(__name__)

LOGGER_PACKAGES: dict[str, tuple[str, ...]] = {
    "WandbLogger": ("wandb",),
    "MLFlowLogger": ("mlflow",),
    "CometLogger": ("comet_ml",),
    "NeptuneLogger": ("neptune",),
    "TensorBoardLogger": ("tensorboard", "tensorboardX"),
}
"""Logger class name -> the packages of which one must be importable (``pip install`` the first)."""

_VERSIONED = ("TensorBoardLogger", "CSVLogger")
"""Loggers that write ``<save_dir>/<name>/version_<N>`` folders."""


def _class_name(node: dict[str, Any]) -> str:
    return str(node["_target_"]).rsplit(".", 1)[-1]


def _installed(packages: tuple[str, ...]) -> bool:
    return any(importlib.util.find_spec(package) is not None for package in packages)


def check_logger_packages(nodes: dict[str, dict[str, Any]]) -> None:
    """Raise a one-line ``ConfigError`` for a logger whose package is not installed (TensorBoard excepted:
    it falls back to CSV when built)."""
    for name, node in nodes.items():
        cls = _class_name(node)
        packages = LOGGER_PACKAGES.get(cls)
        if packages and cls != "TensorBoardLogger" and not _installed(packages):
            raise ConfigError(
                f"logger.{name} ({cls}) needs the {packages[0]!r} package: pip install {packages[0]} "
                f"(or choose logger=csv)"
            )


def _latest_version(folder: Path) -> int | None:
    """The highest ``N`` of the ``version_N`` folders in ``folder``; None when there are none."""
    numbers = [int(m.group(1)) for p in folder.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(numbers) if numbers else None


def _prepare(node: dict[str, Any], output_dir: str, resuming: bool) -> dict[str, Any]:
    node = dict(node)
    cls = _class_name(node)
    if cls == "TensorBoardLogger" and not _installed(LOGGER_PACKAGES[cls]):
        log.warning("neither tensorboard nor tensorboardX is installed: logging to CSV (pip install tensorboard)")
        from lightning.pytorch.loggers import CSVLogger

        accepted = set(inspect.signature(CSVLogger).parameters)
        node = {key: value for key, value in node.items() if key in accepted}
        node["_target_"] = "lightning.pytorch.loggers.CSVLogger"
        cls = "CSVLogger"
    if cls in _VERSIONED:
        node.setdefault("save_dir", output_dir)
        if resuming and node.get("version") is None:
            # Continue the folder the interrupted run wrote, rather than starting version_<N+1>.
            name = node.get("name", "lightning_logs") or ""
            node["version"] = _latest_version(Path(node["save_dir"]) / name)
            if cls == "CSVLogger" and node["version"] is not None:
                node["_target_"] = "lightning_moe.resumed_csv_logger.ResumedCSVLogger"
    return node


def instantiate_loggers(nodes: dict[str, dict[str, Any]], output_dir: str, resuming: bool = False) -> list[Any]:
    """Build the loggers of ``nodes`` (the ``logger`` group); ``resuming`` keeps their previous version."""
    from hydra.utils import instantiate

    return [instantiate(_prepare(node, output_dir, resuming)) for node in nodes.values()]


def instantiate_callbacks(nodes: dict[str, dict[str, Any]]) -> list[Any]:
    """Build the callbacks of ``nodes`` (the ``callbacks`` group)."""
    from hydra.utils import instantiate

    return [instantiate(dict(node)) for node in nodes.values()]
