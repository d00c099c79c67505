"""Whether a re-run may resume a run's checkpoint: the keys that may change, and the comparison.

Every checkpoint of ``python -m lightning_moe.train`` stores the run's resolved configuration (plain
types, under :data:`RUN_CONFIG_KEY`). A re-run with the same run folder compares its own configuration
with it; keys outside :data:`MAY_CHANGE_ON_RESUME` that differ stop the run before training, naming
them, because resuming would silently continue another model, data, task mix or optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from lightning_moe.config.errors import ConfigError

__all__ = [
    "MAY_CHANGE_ON_RESUME",
    "RUN_CONFIG_KEY",
    "VALUE_BEFORE_KEY_EXISTED",
    "check_same_run",
    "config_differences",
    "run_config",
]

#: Checkpoint key holding the run's resolved configuration.
RUN_CONFIG_KEY = "run_config"

#: Keys (or whole groups, by prefix) that a resumed run may change: how long and on how many devices it
#: trains, how it is parallelised (checkpoints reshard), logged, checkpointed and decoded, and where the
#: data lives (not which data). The one home of this list.
MAY_CHANGE_ON_RESUME: tuple[str, ...] = (
    "trainer.max_steps",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.accelerator",
    "trainer.val_check_interval",
    "trainer.limit_val_batches",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.nonfinite",
    "trainer.nonfinite_max",
    "strategy",
    "checkpoint",
    "logger",
    "callbacks",
    "generation",
    "data.root",
    "data.cache_dir",
    "data.download",
    "data.num_workers",
    "data.pin_memory",
    "data.eval_max_tokens",
    "data.max_eval_sentences",
    "data.test_splits",
    "name",
    "output_dir",
    "init_from",
    "test_after_fit",
)


#: Keys added to the configuration after checkpoints were written without them, each with the value that
#: reproduces how those runs trained: a stored configuration without the key compares as having this value, so an
#: older run resumes when the key is set to it (and is refused, naming the key, when it is not).
VALUE_BEFORE_KEY_EXISTED: dict[str, Any] = {
    "model.residual_in_compute_dtype": False,  # 2026-12-05: the residual stream was fp32 under autocast
}


def run_config(cfg: Any) -> dict[str, Any]:
    """The resolved configuration ``cfg`` (a ``TrainConfig``) as plain nested dicts, for a checkpoint."""
    from lightning_moe.checkpoint.state import to_plain

    return to_plain(asdict(cfg))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: list(tree) if isinstance(tree, tuple) else tree}


def _may_change(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in MAY_CHANGE_ON_RESUME)


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: saved -> current"`` for every differing key outside :data:`MAY_CHANGE_ON_RESUME`, sorted."""
    old, new = {**VALUE_BEFORE_KEY_EXISTED, **_flatten(saved)}, _flatten(current)
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a == b or _may_change(key):
            continue
        show = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
        out.append(f"{key}: {show(a)} -> {show(b)}")
    return out


def check_same_run(saved: Mapping[str, Any] | None, current: Mapping[str, Any], checkpoint: str) -> None:
    """Stop a re-run whose configuration differs from its checkpoint's (beyond :data:`MAY_CHANGE_ON_RESUME`).

    Args:
        saved: the configuration stored in ``checkpoint`` (None: written before configurations were
            stored; nothing to compare).
        current: this run's (:func:`run_config`).
        checkpoint: the checkpoint's path, named in the message.

    Raises:
        ConfigError: one line listing the differing keys and how to start a new run instead.
    """
    if saved is None:
        return
    differences = config_differences(saved, current)
    if differences:
        shown = "; ".join(differences[:12]) + (f"; ... ({len(differences) - 12} more)" if len(differences) > 12 else "")
        raise ConfigError(
            f"this run's folder holds a checkpoint of another configuration ({checkpoint}); {len(differences)}"
            f" key(s) differ: {shown}. To train this configuration, start a new run with another name (name=NEW)"
            " or output folder; to continue the old run, re-run it with its own settings"
        )
