"""The multitask MoE translator as a LightningModule: loss = token cross entropy + MoE aux losses.

Training batches mix tasks (translation directions and denoising); the loss of each task is logged
apart. Validation has one dataloader per translation direction: loss, and BLEU/chrF on decoded sentences,
computed by sacrebleu with its defaults on the hypotheses of every rank (so the logged scores are what
``sacrebleu`` prints for the same outputs); the signatures are logged once and kept in checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_moe.config.resume import VALUE_BEFORE_KEY_EXISTED
from lightning_moe.config.run import GenerationConfig, OptimConfig
from lightning_moe.metrics import corpus_scores
from lightning_moe.models import MoEConfig, MoETransformer, TransformerConfig, generate, sequence_cross_entropy
from lightning_moe.parallel.optim import fused_kernels_cover

__all__ = ["MultitaskTranslationModule", "transformer_config_from_dict"]


def transformer_config_from_dict(values: dict | TransformerConfig) -> TransformerConfig:
    """A :class:`TransformerConfig` from its ``asdict`` form (checkpoints keep plain types only); a key the
    checkpoint predates takes the value its run trained with (``VALUE_BEFORE_KEY_EXISTED``)."""
    if isinstance(values, TransformerConfig):
        return values
    values = dict(values)
    for key, before in VALUE_BEFORE_KEY_EXISTED.items():  # a checkpoint written before the key existed
        group, _, name = key.partition(".")
        if group == "model" and name not in values:
            values[name] = before
    moe = values.pop("moe", {}) or {}
    known = {f.name for f in fields(TransformerConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}; valid keys: {sorted(known)}")
    return TransformerConfig(**values, moe=moe if isinstance(moe, MoEConfig) else MoEConfig(**moe))


def _dataclass_from(cls: type, values: Any) -> Any:
    return values if isinstance(values, cls) else cls(**dict(values or {}))


class MultitaskTranslationModule(pl.LightningModule):
    """Encoder-decoder MoE transformer trained on a mixture of translation and denoising tasks.

    Arguments:
        model: the architecture (:class:`TransformerConfig` or its ``asdict``).
        optim: optimizer and schedule (:class:`OptimConfig` or dict).
        generation: decoding for validation BLEU (:class:`GenerationConfig` or dict).
        special_ids: ``{"pad": .., "bos": .., "eos": ..}`` of the tokenizer.
        val_directions: names of the validation dataloaders, in order (e.g. ``["en-de", "de-en"]``).
        max_steps: the run's optimizer steps (for the cosine schedule).
        tokenizer_model: the serialized tokenizer, kept in checkpoints so they translate on their own.
    """

    def __init__(
        self,
        model: dict | TransformerConfig,
        optim: dict | OptimConfig | None = None,
        generation: dict | GenerationConfig | None = None,
        special_ids: dict | None = None,
        val_directions: list | None = None,
        max_steps: int = 1000,
        tokenizer_model: bytes | None = None,
    ) -> None:
        super().__init__()
        self.model_config = transformer_config_from_dict(model)
        self.optim_config = _dataclass_from(OptimConfig, optim)
        self.generation_config = _dataclass_from(GenerationConfig, generation)
        self.special_ids = dict(special_ids or {"pad": 0, "bos": 1, "eos": 2})
        self.val_directions = list(val_directions or [])
        self.max_steps = int(max_steps)
        self.tokenizer_model = tokenizer_model
        self._tokenizer = None
        self._decoded: set[str] = set()
        # direction -> this rank's (hypothesis, reference) pairs of the current validation
        self._val_pairs: dict[str, list[tuple[str, str]]] = {}
        self.metric_signatures: dict[str, str] = {}
        """sacrebleu's signatures of the logged ``bleu`` and ``chrf`` (set at the first validation that decodes)."""
        self._signatures_logged = False
        self.save_hyperparameters(
            {
                "model": asdict(self.model_config),
                "optim": asdict(self.optim_config),
                "generation": asdict(self.generation_config),
                "special_ids": self.special_ids,
                "val_directions": self.val_directions,
                "max_steps": self.max_steps,
            }
        )
        self.model = MoETransformer(self.model_config)

    # ------------------------------------------------------------------------------------ tokenizer

    @property
    def tokenizer(self):
        """The tokenizer kept with the module (None when it was built without one)."""
        if self._tokenizer is None and self.tokenizer_model is not None:
            from lightning_moe.data.tokenizer import SubwordTokenizer

            self._tokenizer = SubwordTokenizer(self.tokenizer_model)
        return self._tokenizer

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer_model is not None:
            checkpoint["tokenizer_model"] = torch.frombuffer(bytearray(self.tokenizer_model), dtype=torch.uint8).clone()
        if self.metric_signatures:
            checkpoint["metric_signatures"] = dict(self.metric_signatures)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("tokenizer_model")
        if stored is not None:
            self.tokenizer_model = bytes(stored.numpy().tobytes()) if isinstance(stored, Tensor) else bytes(stored)
            self._tokenizer = None
        self.metric_signatures = dict(checkpoint.get("metric_signatures") or {})

    # -------------------------------------------------------------------------------------- training

    def forward(self, batch: dict[str, Any]):
        return self.model(batch["src"], batch.get("src_padding_mask"), batch["tgt_in"], batch.get("tgt_padding_mask"))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, details = self.model.loss(batch, self.optim_config.label_smoothing)
        batch_size = batch["src"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/nll", details["nll"], batch_size=batch_size)
        if self.model.has_moe:
            self.log("train/aux_loss", details["aux_loss"], batch_size=batch_size)
        for task, task_nll in self._per_task_nll(details["token_nll"], batch).items():
            self.log(f"train/{task}/nll", task_nll, batch_size=batch_size)
        return loss

    def _per_task_nll(self, token_nll: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Mean nll over each task's real target tokens, from the loss's per-token nll ``[B, T]``."""
        tasks = batch.get("task")
        if not tasks:
            return {}
        mask = batch.get("tgt_padding_mask")
        real = torch.ones_like(token_nll) if mask is None else (~mask).to(token_nll.dtype)  # [B, T]
        result = {}
        for task in sorted(set(tasks)):
            rows = torch.tensor([i for i, t in enumerate(tasks) if t == task], device=token_nll.device)
            count = real.index_select(0, rows).sum().clamp_min(1.0)
            result[task.replace(":", "_")] = token_nll.index_select(0, rows).sum() / count
        return result

    # ------------------------------------------------------------------------------------ validation

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        direction = (
            self.val_directions[dataloader_idx] if dataloader_idx < len(self.val_directions) else str(dataloader_idx)
        )
        out = self(batch)
        _, nll, _ = sequence_cross_entropy(out.logits, batch["tgt_out"], batch.get("tgt_padding_mask"), 0.0)
        self.log(
            f"val/{direction}/nll", nll, batch_size=batch["src"].shape[0], sync_dist=True, add_dataloader_idx=False
        )
        num_tokens = (
            (~batch["tgt_padding_mask"]).sum()
            if batch.get("tgt_padding_mask") is not None
            else batch["tgt_out"].numel()
        )
        self._val_nll_sum += nll.detach().double() * num_tokens
        self._val_tokens += num_tokens
        limit = self.generation_config.val_max_sentences
        if limit == 0 or "ref_text" not in batch or self.tokenizer is None or direction not in self.val_directions:
            return
        # The decision to decode a batch depends on batch_idx only, so every rank decodes the same
        # batches (sharded models need all ranks in each forward).
        batch_size = batch["src"].shape[0]
        if limit > 0 and batch_idx * batch_size >= math.ceil(limit / max(self.trainer.world_size, 1)):
            return
        hypotheses = self.translate_batch(batch["src"], batch.get("src_padding_mask"))
        self._decoded.add(direction)  # the same on every rank: metrics are computed (a collective) together
        if batch.get("is_repeat"):
            return
        self._val_pairs.setdefault(direction, []).extend(zip(hypotheses, batch["ref_text"]))

    def on_validation_epoch_start(self) -> None:
        self._val_nll_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_pairs = {}

    def on_validation_epoch_end(self) -> None:
        totals = torch.stack([self._val_nll_sum, self._val_tokens]).float()
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        self.log("val/nll", totals[0] / totals[1].clamp_min(1.0), prog_bar=True)
        decoded = [d for d in self.val_directions if d in self._decoded]
        self._decoded.clear()
        if not decoded:
            return
        pairs = self._gather_pairs({d: self._val_pairs.get(d, []) for d in decoded})
        self._val_pairs = {}
        bleus, chrfs = [], []
        for direction in decoded:
            if not pairs[direction]:
                continue
            hypotheses, references = zip(*pairs[direction])
            scores = corpus_scores(hypotheses, references)
            # The same on every rank (each has every rank's sentences): no reduction needed.
            self.log(f"val/{direction}/bleu", scores.bleu, add_dataloader_idx=False)
            self.log(f"val/{direction}/chrf", scores.chrf, add_dataloader_idx=False)
            bleus.append(scores.bleu)
            chrfs.append(scores.chrf)
            self._record_signatures(scores.bleu_signature, scores.chrf_signature)
        if bleus:
            self.log("val/bleu", sum(bleus) / len(bleus), prog_bar=True, add_dataloader_idx=False)
            self.log("val/chrf", sum(chrfs) / len(chrfs), add_dataloader_idx=False)

    def _gather_pairs(self, pairs: dict[str, list[tuple[str, str]]]) -> dict[str, list[tuple[str, str]]]:
        """Every rank's decoded pairs, per direction (one collective; sentences are strings, not tensors)."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return pairs
        import torch.distributed as dist

        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, pairs)
        return {d: [pair for part in gathered for pair in part[d]] for d in pairs}

    def _record_signatures(self, bleu: str, chrf: str) -> None:
        """Keep the metrics' signatures (checkpoints) and log them once, or again if they change."""
        signatures = {"bleu": bleu, "chrf": chrf}
        if signatures == self.metric_signatures and self._signatures_logged:
            return
        self.metric_signatures = signatures
        self._signatures_logged = True
        rank_zero_info(f"validation BLEU signature: {bleu}; chrF signature: {chrf}")
        if self._trainer is not None:
            for logger in self.loggers:
                logger.log_hyperparams({"val_bleu_signature": bleu, "val_chrf_signature": chrf})

    # ------------------------------------------------------------------------------------ generation

    @torch.no_grad()
    def translate_batch(self, src: Tensor, src_padding_mask: Tensor | None = None) -> list[str]:
        """Decode a batch of tagged sources to detokenized strings."""
        g = self.generation_config
        ids = generate(
            self.model,
            src,
            src_padding_mask,
            bos_id=self.special_ids["bos"],
            eos_id=self.special_ids["eos"],
            pad_id=self.special_ids["pad"],
            beam_size=g.beam_size,
            max_len_a=g.max_len_a,
            max_len_b=g.max_len_b,
            **({"length_penalty_alpha": g.length_penalty} if g.beam_size > 1 else {}),
            **self._sync_kwargs(),
        )
        return [self.tokenizer.decode(row) for row in ids]

    def _sync_kwargs(self) -> dict[str, Callable[[bool], bool]]:
        """Under a multi-rank strategy, decoding loops stop only when every rank is done."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return {}
        strategy = self.trainer.strategy

        def all_done(local_done: bool) -> bool:
            flag = torch.tensor(0.0 if local_done else 1.0, device=self.device)
            return float(strategy.reduce(flag, reduce_op="sum")) == 0.0

        return {"sync_done": all_done}

    # ------------------------------------------------------------------------------------- optimizer

    def configure_optimizers(self):
        o = self.optim_config
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            is_matrix = param.ndim >= 2 and "embed" not in name and "norm" not in name
            (decay if is_matrix else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
        )
        if fused_kernels_cover(p for group in optimizer.param_groups for p in group["params"]):
            # Fused AdamW (CPU and CUDA kernels, several times faster than the per-parameter loop), set on the
            # groups after construction so the optimizer does not claim to unscale gradients itself: Lightning's
            # AMP plugin then allows clipping, and an fp16 GradScaler unscales before the step as usual.
            for group in optimizer.param_groups:
                group["fused"] = True
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(o, self.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _schedule(o: OptimConfig, max_steps: int) -> Callable[[int], float]:
    warmup = max(o.warmup_steps, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "inverse_sqrt":
            return math.sqrt(warmup / (step + 1))
        if o.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor
