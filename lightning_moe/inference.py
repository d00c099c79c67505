"""Loading a trained translator from any checkpoint, and translating sentences with it (one process).

Checkpoints of every layout load here: a Lightning file, a full file of ``moe_zero``, a consolidated
file, or a sharded DCP folder (consolidated on the fly, no process group needed), all with
``weights_only=True``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_moe.data.batching import pad_sequences
from lightning_moe.data.tokenizer import SubwordTokenizer
from lightning_moe.module import MultitaskTranslationModule

__all__ = [
    "read_checkpoint",
    "load_model_weights",
    "tokenizer_bytes",
    "load_translator",
    "translator_from_checkpoint",
    "resolve_device",
    "training_data",
    "check_language",
    "translation_source",
    "translate_sentences",
]

PathLike = str | os.PathLike


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """Every part of a checkpoint as one dict of plain types (``state_dict``, ``hyper_parameters``, ...).

    Raises:
        FileNotFoundError: ``path`` does not exist (other ``OSError``: it cannot be read).
        ValueError: ``path`` is not a checkpoint (the message says why).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        from lightning_moe.checkpoint import consolidate

        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "consolidated.pt"
            consolidate(path, target)
            checkpoint = torch.load(target, map_location="cpu", weights_only=True)
    else:
        from lightning_moe.checkpoint.files import read_torch_file
        from lightning_moe.checkpoint.manifest import verify_checkpoint

        verify_checkpoint(path)
        checkpoint = read_torch_file(path, weights_only=True)  # a clear ValueError for pickled code / no checkpoint
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{str(path)!r} holds a {type(checkpoint).__name__}, not a lightning_moe checkpoint")
    meta = checkpoint.pop("meta", None)
    if isinstance(meta, dict):  # consolidated layout: {"state_dict", "optimizer_states", "meta"}
        for key, value in meta.items():
            checkpoint.setdefault(key, value)
    if "state_dict" not in checkpoint:
        raise ValueError(
            f"{str(path)!r} holds no 'state_dict': not a lightning_moe checkpoint (keys: {sorted(checkpoint)})"
        )
    return checkpoint


def load_model_weights(module: torch.nn.Module, path: PathLike, checkpoint: dict[str, Any] | None = None) -> None:
    """Load the weights of checkpoint ``path`` (any layout) into an unsharded ``module``.

    ``checkpoint``: the already read checkpoint (:func:`read_checkpoint`), to avoid reading it twice.

    Raises:
        ValueError: listing missing, unexpected and differently shaped keys when the checkpoint comes
            from another model shape.
    """
    state = (checkpoint if checkpoint is not None else read_checkpoint(path))["state_dict"]
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if isinstance(state[k], Tensor) and state[k].shape != own[k].shape
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:20]}{' ...' if len(shapes) > 20 else ''}")
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit this model (another model shape?): " + "; ".join(parts)
        )
    module.load_state_dict(state)


def load_translator(path: PathLike, device: str | torch.device = "cpu", **overrides: Any) -> MultitaskTranslationModule:
    """The :class:`MultitaskTranslationModule` of a checkpoint, in eval mode, with its tokenizer.

    ``overrides`` replace hyper-parameters; a dict replaces only the keys it names (e.g.
    ``generation={"beam_size": 4}`` keeps the stored length limits).
    """
    return translator_from_checkpoint(read_checkpoint(path), path, device, **overrides)


def translator_from_checkpoint(
    checkpoint: dict[str, Any], path: PathLike, device: str | torch.device = "cpu", **overrides: Any
) -> MultitaskTranslationModule:
    """:func:`load_translator` of an already read checkpoint (:func:`read_checkpoint`); ``path`` names it in errors.

    Raises:
        ValueError: the checkpoint lacks the model's hyper-parameters or tokenizer, or does not fit the model.
    """
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "model" not in hparams:
        raise ValueError(f"checkpoint {str(path)!r} has no model hyper-parameters: not saved by lightning_moe.train")
    tokenizer_model = checkpoint.get("tokenizer_model")
    if tokenizer_model is None:
        raise ValueError(f"checkpoint {str(path)!r} has no tokenizer: it cannot translate text")
    for key, value in overrides.items():  # a dict override changes only the keys it names
        stored = hparams.get(key)
        hparams[key] = {**stored, **value} if isinstance(stored, dict) and isinstance(value, dict) else value
    try:
        module = MultitaskTranslationModule(
            model=hparams["model"],
            optim=hparams.get("optim"),
            generation=hparams.get("generation"),
            special_ids=hparams.get("special_ids"),
            val_directions=hparams.get("val_directions"),
            max_steps=hparams.get("max_steps", 1),
            tokenizer_model=tokenizer_bytes(tokenizer_model),
        )
        state = {k: v for k, v in checkpoint["state_dict"].items() if k in module.state_dict()}
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:  # hyper-parameters or weights of another version
        raise ValueError(
            f"checkpoint {str(path)!r} does not load into this version's model: {_first_line(err)}"
        ) from err
    return module.to(device).eval()


def _first_line(err: BaseException) -> str:
    """The first non-empty line of an error's message (torch adds long explanations), else its type."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; any other name as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def training_data(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The data config (``DataConfig`` as a dict: ``root``, ``langs``, ``test_splits``, ...) the checkpoint's
    model was trained with, as ``lightning_moe.train`` records it; None when the checkpoint lacks it."""
    data = (checkpoint.get("datamodule_hyper_parameters") or {}).get("data")
    return dict(data) if isinstance(data, dict) else None


def check_language(module: MultitaskTranslationModule, lang: str, key: str) -> None:
    """Raise ``ValueError`` naming ``key`` and the model's languages unless ``lang`` is one of them."""
    langs = list(module.tokenizer.langs)
    if lang not in langs:
        raise ValueError(f"{key}={lang!r} is not a language of this model: use one of {langs}")


def tokenizer_bytes(stored: Any) -> bytes:
    """The serialized tokenizer as kept in a checkpoint (a 1-D uint8 tensor, or bytes), read as data.

    Raises:
        ValueError: anything else (an int would otherwise become that many zero bytes).
    """
    if isinstance(stored, Tensor) and stored.dtype == torch.uint8 and stored.dim() == 1:
        return bytes(stored.numpy().tobytes())
    if isinstance(stored, (bytes, bytearray)):
        return bytes(stored)
    kind = (
        f"a {stored.dtype} tensor of shape {list(stored.shape)}"
        if isinstance(stored, Tensor)
        else type(stored).__name__
    )
    raise ValueError(f"the checkpoint's tokenizer_model is {kind}, not the bytes of a tokenizer model")


def translation_source(
    tokenizer: SubwordTokenizer, text: str, target_lang: str, max_len: int | None = None
) -> list[int]:
    """Encoder input of a sentence to translate into ``target_lang``: ``[<2tgt>] + tokens + [</s>]``
    (the layout of ``lightning_moe.tasks.translation``), cut to ``max_len`` tokens."""
    tokens = tokenizer.encode(text)
    if max_len is not None and len(tokens) + 2 > max_len:
        tokens = tokens[: max(max_len - 2, 0)]
    return [tokenizer.lang_tag_id(target_lang), *tokens, tokenizer.eos_id]


@torch.no_grad()
def translate_sentences(
    module: MultitaskTranslationModule,
    sentences: Iterable[str],
    target_lang: str,
    batch_size: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Translate ``sentences`` into ``target_lang``, in batches of similar length, keeping their order.

    An empty or whitespace-only sentence translates to ``""`` without decoding (a model would invent
    text for it). ``on_batch(n)`` is called after each decoded batch of ``n`` sentences (progress bars).
    """
    sentences = list(sentences)
    tokenizer = module.tokenizer
    check_language(module, target_lang, "target_lang")
    max_len = module.model_config.max_positions - 1
    todo = [i for i, s in enumerate(sentences) if s.strip()]
    sources = {i: translation_source(tokenizer, sentences[i], target_lang, max_len) for i in todo}
    order = sorted(todo, key=lambda i: len(sources[i]))  # similar lengths together: less padding
    batch_size = batch_size or module.generation_config.batch_size
    outputs = [""] * len(sentences)
    device = next(module.parameters()).device
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        src, mask = pad_sequences([sources[i] for i in rows], module.special_ids["pad"])  # [B, S]
        for row, text in zip(rows, module.translate_batch(src.to(device), mask.to(device))):
            outputs[row] = text
        if on_batch is not None:
            on_batch(len(rows))
    return outputs
