"""``python -m lightning_moe.translate checkpoint=PATH source_lang=en target_lang=de``

Reads one sentence per line from stdin (or ``input=FILE``) and writes one translation per line to
stdout (or ``output=FILE``). Any checkpoint layout works (file or sharded folder).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from lightning_moe.cli import parse_args

USAGE = "usage: python -m lightning_moe.translate checkpoint=PATH source_lang=en target_lang=de [input=FILE] [output=FILE] [beam_size=4]"


@dataclass
class TranslateConfig:
    """Arguments of ``lightning_moe.translate``."""

    checkpoint: str = "???"
    """A checkpoint written by ``lightning_moe.train`` (file or folder)."""
    source_lang: str = "en"
    """Language of the input sentences (informative: the model reads any language)."""
    target_lang: str = "de"
    """Language to translate into (one of the model's languages)."""
    input: Optional[str] = None
    """File of sentences, one a line; None = stdin."""
    output: Optional[str] = None
    """File for the translations; None = stdout."""
    beam_size: int = 1
    """1 = greedy; more = beam search."""
    batch_size: int = 64
    """Sentences decoded together."""
    device: str = "auto"
    """``cpu``, ``cuda`` or ``auto``."""

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size={self.beam_size} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.source_lang == self.target_lang:
            raise ValueError(f"source_lang and target_lang are both {self.source_lang!r}: pick two languages")


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_args(TranslateConfig, argv, USAGE)
    from lightning_moe.inference import load_translator, translate_sentences

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    module = load_translator(cfg.checkpoint, device, generation={"beam_size": cfg.beam_size, "batch_size": cfg.batch_size})
    if cfg.input:
        lines = Path(cfg.input).read_text(encoding="utf-8").splitlines()
    else:
        lines = sys.stdin.read().splitlines()
    translations = translate_sentences(module, lines, cfg.target_lang, cfg.batch_size)
    text = "".join(t + "\n" for t in translations)
    if cfg.output:
        Path(cfg.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
