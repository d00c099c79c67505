"""``python -m lightning_moe.evaluate checkpoint=PATH [data.root=PATH] [splits=[test_2016_flickr]]``

Translates the test sets of every direction the model was validated on and prints BLEU and chrF per
direction and split, with sacrebleu's signatures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from lightning_moe.cli import parse_args

USAGE = "usage: python -m lightning_moe.evaluate checkpoint=PATH [root=DATA_DIR] [splits=[test_2016_flickr,test_2017_flickr]] [directions=[en-de]] [beam_size=4] [max_sentences=N] [json=FILE]"


@dataclass
class EvaluateConfig:
    """Arguments of ``lightning_moe.evaluate``."""

    checkpoint: str = "???"
    """A checkpoint written by ``lightning_moe.train`` (file or folder)."""
    root: Optional[str] = None
    """Corpus folder (``{split}.{lang}.gz``); None = the embedded sample."""
    splits: list = field(default_factory=lambda: ["test_2016_flickr"])
    """Test splits to score (a direction is skipped where a split lacks one of its languages)."""
    directions: list = field(default_factory=list)
    """Directions such as ``en-de``; empty = those the model was validated on."""
    beam_size: int = 1
    """1 = greedy; more = beam search."""
    batch_size: int = 64
    """Sentences decoded together."""
    max_sentences: Optional[int] = None
    """Score only the first N sentences of each split (quick checks)."""
    device: str = "auto"
    """``cpu``, ``cuda`` or ``auto``."""
    json: Optional[str] = None
    """Also write the scores to this JSON file."""


def evaluate(cfg: EvaluateConfig) -> list[dict[str, Any]]:
    """BLEU and chrF of every (split, direction); returns the rows that :func:`main` prints."""
    import sacrebleu

    from lightning_moe.config.schema import SAMPLE_DATA_DIR
    from lightning_moe.data.corpus import available_languages, load_split
    from lightning_moe.inference import load_translator, translate_sentences

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    module = load_translator(cfg.checkpoint, device, generation={"beam_size": cfg.beam_size, "batch_size": cfg.batch_size})
    directions = [d.split(":")[-1] for d in (cfg.directions or module.val_directions) if "-" in d]
    if not directions:
        raise SystemExit("error: no translation directions: pass directions=[en-de,...]")
    root = cfg.root or str(SAMPLE_DATA_DIR)
    rows = []
    for split in cfg.splits:
        langs = set(available_languages(root, split))
        for direction in directions:
            src, tgt = direction.split("-")
            if not {src, tgt} <= langs:
                continue
            corpus = load_split(root, split, [src, tgt], max_len_chars=None)
            pairs = corpus.pairs(src, tgt)
            if cfg.max_sentences:
                pairs = pairs[: cfg.max_sentences]
            sources = [s for s, _ in pairs]
            references = [t for _, t in pairs]
            hypotheses = translate_sentences(module, sources, tgt, cfg.batch_size)
            bleu = sacrebleu.metrics.BLEU()
            chrf = sacrebleu.metrics.CHRF()
            bleu_score = bleu.corpus_score(hypotheses, [references])
            chrf_score = chrf.corpus_score(hypotheses, [references])
            rows.append(
                {
                    "split": split,
                    "direction": direction,
                    "sentences": len(pairs),
                    "bleu": round(bleu_score.score, 2),
                    "chrf": round(chrf_score.score, 2),
                    "bleu_signature": str(bleu.get_signature()),
                    "chrf_signature": str(chrf.get_signature()),
                }
            )
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_args(EvaluateConfig, argv, USAGE)
    rows = evaluate(cfg)
    print(f"{'split':<20} {'direction':<9} {'sents':>6} {'BLEU':>6} {'chrF':>6}")
    for r in rows:
        print(f"{r['split']:<20} {r['direction']:<9} {r['sentences']:>6} {r['bleu']:>6.2f} {r['chrf']:>6.2f}")
    if rows:
        print(f"BLEU signature: {rows[0]['bleu_signature']}")
        print(f"chrF signature: {rows[0]['chrf_signature']}")
    if cfg.json:
        with open(cfg.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
