"""Fine-tune a Hugging Face MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) on a local text file with
expert parallelism + ZeRO-3 (``Trainer(strategy=MoEZeroStrategy(expert_parallel_size=2, zero_stage=3))``).

The LightningModule holds the unmodified transformers model and its own loss; the strategy recognises the
MoE blocks, splits their experts over the ``ep`` ranks (all-to-all token dispatch) and ZeRO-shards the rest.

Without ``--model`` a tiny random model of ``--arch`` is built (byte-level: vocabulary of 256 bytes, no
tokenizer, nothing downloaded); with ``--model FOLDER`` a local ``from_pretrained`` folder and its tokenizer
are used. On 2 CPU processes::

    python examples/hf_moe_finetune.py --text README.md --devices 2 --max-steps 20 --export out/hf_moe

``--export`` writes the trained model to a folder that ``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_moe.strategy import MoEZeroStrategy

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def tiny_random_model(arch: str, num_experts: int) -> torch.nn.Module:
    """A small random-initialised causal LM of ``arch`` over bytes (vocabulary 256)."""
    import transformers

    common = dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    )
    if arch == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=128, num_local_experts=num_experts, **common)
    elif arch == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=128,
            num_experts=num_experts, **common,
        )  # fmt: skip
    elif arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            intermediate_size=128, moe_intermediate_size=64, num_experts=num_experts, **common
        )
    else:
        config = transformers.OlmoeConfig(intermediate_size=64, num_experts=num_experts, **common)
    return transformers.AutoModelForCausalLM.from_config(config)


class TextChunks(Dataset):
    """Fixed-length windows of a token sequence (next-token targets are the inputs shifted inside the model)."""

    def __init__(self, ids: torch.Tensor, seq_len: int) -> None:
        self.ids, self.seq_len = ids, seq_len
        if len(ids) < seq_len:
            raise ValueError(f"the text has {len(ids)} tokens, fewer than --seq-len {seq_len}; pass a longer file")

    def __len__(self) -> int:
        return len(self.ids) // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ids[i * self.seq_len : (i + 1) * self.seq_len]


class CausalLMFineTune(L.LightningModule):
    """The user's module: the transformers model as it is, its loss, AdamW."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, ids: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=ids, labels=ids).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", required=True, help="a local UTF-8 text file to fine-tune on")
    parser.add_argument("--model", help="a local from_pretrained folder (default: a tiny random --arch model)")
    parser.add_argument("--arch", choices=ARCHS, default="mixtral")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--expert-parallel-size", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, ...")
    parser.add_argument("--export", help="folder to write the trained model to (from_pretrained format)")
    parser.add_argument("--checkpoint", default="out/hf_moe_finetune.ckpt", help="where the final checkpoint goes")
    args = parser.parse_args(argv)

    text_path = Path(args.text)
    if not text_path.is_file():
        print(f"error: --text {args.text!r} is not a file; pass a local text file", file=sys.stderr)
        return 2
    text = text_path.read_text(encoding="utf-8", errors="replace")
    L.seed_everything(0)
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model)
        ids = torch.tensor(AutoTokenizer.from_pretrained(args.model)(text)["input_ids"])
    else:
        model = tiny_random_model(args.arch, args.num_experts)
        ids = torch.tensor(list(text.encode("utf-8")))
    data = DataLoader(TextChunks(ids, args.seq_len), batch_size=args.batch_size, shuffle=True, drop_last=True)

    strategy = MoEZeroStrategy(expert_parallel_size=args.expert_parallel_size, zero_stage=args.zero_stage)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        max_steps=args.max_steps,
        precision=args.precision,
        log_every_n_steps=5,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(CausalLMFineTune(model, args.lr), train_dataloaders=data)
    trainer.save_checkpoint(args.checkpoint)
    if args.export and trainer.is_global_zero:
        from lightning_moe.hf import export_pretrained

        out = export_pretrained(args.checkpoint, args.export, config=model.config, prefix="model.")
        print(f"exported to {out} (AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
