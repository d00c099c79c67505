"""``python -m lightning_moe.evaluate checkpoint=PATH [data.root=PATH] [splits=[test_2016_flickr]]``

Translates the test splits in every direction the model was validated on and prints BLEU and chrF per
direction and split, with sacreBLEU's signatures. The corpus, the splits and the directions default to
those the checkpoint was trained with; errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_moe.cli import fail, is_terminal, one_line, parse_args, progress_bar

__all__ = [
    "EvaluateConfig",
    "EvaluateDataConfig",
    "evaluate",
    "format_examples",
    "format_scores",
    "write_scores",
    "main",
]

USAGE = (
    "usage: python -m lightning_moe.evaluate checkpoint=PATH [data.root=DATA_DIR] "
    "[splits=[test_2016_flickr,test_2017_flickr]] [directions=[en-de]] [beam_size=4] [length_penalty=1.0] [max_sentences=N] [json=FILE]"
)


@dataclass
class EvaluateDataConfig:
    """Where the test splits are read (the key of ``train``'s ``data`` group that matters here)."""

    root: str | None = None
    """Corpus folder of ``{split}.{lang}[.gz]`` files; null = the corpus the checkpoint was trained on."""


@dataclass
class EvaluateConfig:
    """Arguments of ``lightning_moe.evaluate``."""

    checkpoint: str = "???"
    """A checkpoint written by ``lightning_moe.train`` (file or folder)."""
    data: EvaluateDataConfig = field(default_factory=EvaluateDataConfig)
    """The corpus (``data.root=``)."""
    splits: list[str] = field(default_factory=list)
    """Test splits to score; empty = the checkpoint's ``data.test_splits``. A direction is skipped where a
    split lacks one of its languages."""
    directions: list[str] = field(default_factory=list)
    """Directions such as ``en-de`` (any two of the model's languages); empty = those the model was
    validated on."""
    beam_size: int = 1
    """1 = greedy; more = beam search."""
    length_penalty: float | None = None
    """Beam search length penalty exponent (GNMT style, 0 = none); null = the checkpoint's."""
    batch_size: int = 64
    """Sentences decoded together."""
    max_sentences: int | None = None
    """Score only the first N sentences of each split (quick checks); null = all."""
    device: str = "auto"
    """``cpu``, ``cuda`` or ``auto``."""
    json: str | None = None
    """Also write the scores (with their signatures) to this JSON file."""

    def __post_init__(self) -> None:
        for key in ("beam_size", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} is invalid: use an integer >= 1")
        if self.max_sentences is not None and self.max_sentences < 1:
            raise ValueError(f"max_sentences={self.max_sentences} is invalid: use an integer >= 1 or null")


EXAMPLES = 3
"""Sentences of each scored (split, direction) kept with their translations (``examples`` of a row)."""


def _directions(requested: Sequence[str], validated: Sequence[str], langs: Sequence[str]) -> list[tuple[str, str]]:
    """``(src, tgt)`` pairs of ``requested`` (default: the translation tasks among ``validated``)."""
    names = list(requested) or [d.split(":")[-1] for d in validated if d.startswith("translate:")]
    if not names:
        raise ValueError("the checkpoint names no translation directions: pass directions=[en-de,...]")
    pairs = []
    for name in names:
        src, _, tgt = str(name).partition("-")
        if not (src in langs and tgt in langs and src != tgt):
            raise ValueError(
                f"directions: {name!r} is not a direction of this model: use src-tgt with two of its languages "
                f"{list(langs)}, e.g. {langs[0]}-{langs[-1]}"
            )
        pairs.append((src, tgt))
    return pairs


def _data_root(root: str | None, data: dict[str, Any] | None, splits: Sequence[str], langs: Sequence[str]) -> Path:
    """The corpus folder: ``data.root=`` when given, else the one the checkpoint was trained on."""
    from lightning_moe.data.download import resolve_data_root

    if root is not None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise ValueError(f"data.root={root!r} is not a folder: pass a folder of {{split}}.{{lang}}[.gz] files")
        return path
    if data is None:
        raise ValueError("the checkpoint does not record the corpus it was trained on: pass data.root=FOLDER")
    if data.get("root") is not None:
        path = Path(data["root"]).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"the corpus the checkpoint was trained on ({data['root']}) no longer exists: pass data.root=FOLDER"
            )
        return path
    # trained on $LIGHTNING_MOE_DATA or Multi30k in the cache: find it the way training did, without downloading
    try:
        return resolve_data_root(None, data.get("cache_dir"), download=False, langs=langs, splits=splits)
    except ValueError as err:
        raise ValueError(
            f"the Multi30k copy the checkpoint was trained on is not here ({one_line(err)}): pass data.root=FOLDER"
        ) from err


def evaluate(cfg: EvaluateConfig, progress: bool | None = None) -> list[dict[str, Any]]:
    """BLEU and chrF of every (split, direction); returns the rows that :func:`main` prints.

    ``progress``: a bar on stderr while decoding; None = when stderr is a terminal.

    Raises:
        FileNotFoundError, ValueError: a missing or unreadable checkpoint, an unknown direction, a
            missing corpus or split (the message says which and what to pass).
    """
    from lightning_moe.data.corpus import available_languages, available_splits, load_split
    from lightning_moe.data.datamodule import DataConfig
    from lightning_moe.inference import (
        read_checkpoint,
        resolve_device,
        training_data,
        translate_sentences,
        translator_from_checkpoint,
    )
    from lightning_moe.metrics import corpus_scores

    checkpoint = read_checkpoint(cfg.checkpoint)
    generation = {"beam_size": cfg.beam_size, "batch_size": cfg.batch_size}
    if cfg.length_penalty is not None:
        generation["length_penalty"] = cfg.length_penalty
    module = translator_from_checkpoint(checkpoint, cfg.checkpoint, resolve_device(cfg.device), generation=generation)
    langs = list(module.tokenizer.langs)
    pairs = _directions(cfg.directions, module.val_directions, langs)
    data = training_data(checkpoint)
    splits = list(cfg.splits) or list((data or {}).get("test_splits") or DataConfig().test_splits)
    root = _data_root(cfg.data.root, data, splits, sorted({lang for pair in pairs for lang in pair}))
    missing = [split for split in splits if split not in available_splits(root)]
    if missing:
        raise ValueError(
            f"splits: {missing} have no files in {root}: use some of {available_splits(root)} (or pass data.root=)"
        )
    show = is_terminal() if progress is None else progress
    rows = []
    for split in splits:
        present = set(available_languages(root, split))
        for src, tgt in pairs:
            if not {src, tgt} <= present:
                continue
            corpus = load_split(root, split, [src, tgt], max_len_chars=None, max_sentences=cfg.max_sentences)
            pairs_text = corpus.pairs(src, tgt)
            sources = [s for s, _ in pairs_text]
            references = [t for _, t in pairs_text]
            with progress_bar(len(sources), f"{split} {src}-{tgt}", enabled=show) as bar:
                hypotheses = translate_sentences(module, sources, tgt, cfg.batch_size, on_batch=bar.update)
            scores = corpus_scores(hypotheses, references)
            rows.append(
                {
                    "split": split,
                    "direction": f"{src}-{tgt}",
                    "sentences": len(pairs_text),
                    "bleu": round(scores.bleu, 2),
                    "chrf": round(scores.chrf, 2),
                    "bleu_signature": scores.bleu_signature,
                    "chrf_signature": scores.chrf_signature,
                    "examples": [
                        {"source": s, "hypothesis": h, "reference": r}
                        for s, h, r in zip(sources[:EXAMPLES], hypotheses[:EXAMPLES], references[:EXAMPLES])
                    ],
                }
            )
    if not rows:
        raise ValueError(
            f"no split of {splits} in {root} has both languages of a direction of "
            f"{[f'{s}-{t}' for s, t in pairs]}: pick other splits= or directions="
        )
    return rows


def format_examples(row: dict[str, Any]) -> str:
    """The first sentences of one scored (split, direction): source, the model's translation, the reference."""
    lines = [f"sample translations, {row['split']} {row['direction']}:"]
    for example in row.get("examples", []):
        lines += [f"  source:    {example['source']}", f"  model:     {example['hypothesis']}"]
        lines += [f"  reference: {example['reference']}", ""]
    return "\n".join(lines).rstrip()


def format_scores(rows: Sequence[dict[str, Any]]) -> str:
    """A table of ``rows`` (from :func:`evaluate`) followed by the sacreBLEU signatures of its scores."""
    lines = [f"{'split':<20} {'direction':<9} {'sents':>6} {'BLEU':>6} {'chrF':>6}"]
    for r in rows:
        lines.append(f"{r['split']:<20} {r['direction']:<9} {r['sentences']:>6} {r['bleu']:>6.2f} {r['chrf']:>6.2f}")
    for metric, key in (("BLEU", "bleu_signature"), ("chrF", "chrf_signature")):
        for signature in dict.fromkeys(r[key] for r in rows):  # the same for every row unless options differ
            lines.append(f"{metric} signature: {signature}")
    return "\n".join(lines)


def write_scores(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write ``rows`` (scores and signatures) as a JSON list to ``path``."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(list(rows), handle, indent=2)
        handle.write("\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    cfg = parse_args(EvaluateConfig, argv, USAGE)
    try:
        rows = evaluate(cfg)
    except (OSError, ValueError) as err:
        fail(err)
    print(format_scores(rows))
    if cfg.json:
        try:
            write_scores(rows, cfg.json)
        except OSError as err:
            fail(f"cannot write json={cfg.json}: {err.strerror or one_line(err)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
