"""Hugging Face export: a ``moe_zero`` checkpoint of a LightningModule holding a transformers model, written as a
folder that ``AutoModelForCausalLM.from_pretrained`` loads.

The checkpoint may come from any layout (distributed folder or full file, any expert-parallel size or ZeRO
stage): its tensors are stored at their global shapes (experts ``[E, ...]``), which are the transformers
model's own. Loading the other way needs no code: build the LightningModule with
``AutoModelForCausalLM.from_pretrained(folder)`` and the strategy shards the weights onto its layout.

Command line::

    python -m lightning_moe.hf CHECKPOINT OUT_DIR --config HF_FOLDER_OR_CONFIG_JSON [--prefix model.]
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_moe.checkpoint.dcp import read_distributed_full
from lightning_moe.checkpoint.files import PathLike
from lightning_moe.checkpoint.full import read_full
from lightning_moe.checkpoint.state import MODEL_KEY

__all__ = ["export_pretrained", "export_main"]


def _load_config(config: Any) -> Any:
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        config = copy.deepcopy(config)
    else:
        path = Path(config)
        if not path.exists():
            raise FileNotFoundError(
                f"config={str(path)!r} does not exist; pass the model's folder (with config.json), a config.json"
                " file or a transformers PretrainedConfig"
            )
        config = AutoConfig.from_pretrained(path.parent if path.is_file() else path)
    from lightning_moe.parallel.hf_moe import EP_IMPLEMENTATION

    if getattr(config, "_experts_implementation", None) == EP_IMPLEMENTATION:
        config._experts_implementation = None  # the training-time implementation; the exported model picks its own
    return config


def export_pretrained(checkpoint: PathLike, out_dir: PathLike, *, config: Any, prefix: str = "model.") -> Path:
    """Write the transformers model inside a ``moe_zero`` checkpoint to ``out_dir`` with ``save_pretrained``.

    One process, no process group.

    Args:
        checkpoint: a distributed checkpoint folder or a checkpoint file, from any layout.
        out_dir: the folder to write (``config.json`` and safetensors weights).
        config: the model's ``PretrainedConfig``, or its folder / ``config.json``.
        prefix: where the transformers model sits in the LightningModule (``"model."`` for ``self.model``).

    Returns:
        ``out_dir``.
    """
    from transformers import AutoModelForCausalLM

    src, dst = Path(checkpoint), Path(out_dir)
    if not src.exists():
        raise FileNotFoundError(f"checkpoint={str(src)!r} does not exist; pass a checkpoint folder or file")
    hf_config = _load_config(config)
    dst.mkdir(parents=True, exist_ok=True)
    full = read_distributed_full(src, dst, weights_only=True) if src.is_dir() else read_full(src, weights_only=True)
    state = {k[len(prefix) :]: v for k, v in full[MODEL_KEY].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(
            f"no weights under prefix={prefix!r} in {str(src)!r} (first keys: {list(full[MODEL_KEY])[:3]}); pass the"
            " attribute path of the transformers model in the LightningModule followed by '.'"
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = sorted(n for n, p in model.named_parameters() if p.is_meta)
    if still_meta or unexpected:
        raise ValueError(
            f"the checkpoint does not fit {type(model).__name__}: missing {still_meta[:5] or missing[:5]}, "
            f"unexpected {unexpected[:5]}; check config= and prefix="
        )
    model.save_pretrained(dst)
    return dst


def export_main(argv: Sequence[str] | None = None) -> int:
    """Command line entry (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m lightning_moe.hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="distributed checkpoint folder or checkpoint file (any layout)")
    parser.add_argument("out_dir", help="folder to write; AutoModelForCausalLM.from_pretrained loads it")
    parser.add_argument("--config", required=True, help="the model's folder or config.json")
    parser.add_argument("--prefix", default="model.", help="attribute path of the model in the LightningModule + '.'")
    args = parser.parse_args(argv)
    try:
        out = export_pretrained(args.checkpoint, args.out_dir, config=args.config, prefix=args.prefix)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
