"""Checks of ``python -m lightning_moe.train``'s command line that Hydra does not make itself.

- A group option that does not exist (``experiment=finetun``) stops the run with one line listing the
  valid options (Hydra's own message spans a page, and an ``optional`` group would be skipped silently).
- A multirun (``-m``) with several processes per job stops at once: Lightning's subprocess launcher
  starts the other ranks by re-running ``sys.argv``, ``-m`` included, so each child would start a sweep
  of its own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from lightning_moe.config.errors import ConfigError

__all__ = ["check_group_options", "check_multirun", "CONFIG_MODULE"]

CONFIG_MODULE = "lightning_moe.conf"
"""The package holding ``config.yaml`` and the YAML groups."""


def _requested_options(override: Any) -> list[str]:
    """The option names an override asks for (several for ``a,b`` sweeps and ``[a,b]`` lists)."""
    if override.is_sweep_override():
        try:
            return [str(v) for v in override.sweep_string_iterator()]
        except Exception:  # range()/interval() sweeps: not option names, leave them to Hydra
            return []
    value = override.value()
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values if v is not None]


def check_group_options(argv: Sequence[str]) -> None:
    """Raise :class:`ConfigError` if an override of ``argv`` selects an option no config group has.

    Only ``group=option`` overrides of the top-level groups are checked; anything Hydra cannot parse
    is left for Hydra to report.
    """
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lightning_moe.config.schema import register_configs

    items = [a for a in argv if "=" in a and not a.startswith("-")]
    if not items:
        return
    try:
        overrides = OverridesParser.create().parse_overrides(items)
    except Exception:
        return
    register_configs()
    was_initialized = GlobalHydra.instance().is_initialized()
    if was_initialized:
        return  # inside a Hydra app already: Hydra composes and checks
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        loader = GlobalHydra.instance().config_loader()
        groups = set(loader.list_groups(""))
        for override in overrides:
            group = override.key_or_group
            if override.is_delete() or override.package is not None or group not in groups:
                continue
            options = loader.get_group_options(group)
            for option in _requested_options(override):
                if option not in options and option != "null":
                    raise ConfigError(f"{group}={option} is not an option of the {group} group; use one of {options}")


def _argv_relaunched() -> bool:
    """Whether Lightning would start the other ranks by re-running ``sys.argv`` (its subprocess launcher):
    true unless torchrun, SLURM or LSF start every process (or this is such a child)."""
    from lightning.fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment

    if "LOCAL_RANK" in os.environ:
        return False
    external = (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment)
    return not any(env.detect() for env in external)


def check_multirun(multirun: bool, devices: Any, num_nodes: int, accelerator: str) -> None:
    """Raise :class:`ConfigError` for a Hydra multirun whose jobs need several processes started by
    re-running the command line (each child would re-run the whole sweep)."""
    if not multirun:
        return
    processes = num_nodes * (devices if isinstance(devices, int) else 1)
    if devices == "auto" and accelerator in ("gpu", "cuda", "auto"):
        import torch

        processes = num_nodes * max(torch.cuda.device_count(), 1)
    if processes > 1 and _argv_relaunched():
        raise ConfigError(
            f"a multirun (-m) cannot start trainer.devices={devices} processes per job: Lightning re-runs the "
            f"command line, -m included, in every process; run each job without -m, or launch the sweep "
            f"under torchrun/SLURM"
        )
