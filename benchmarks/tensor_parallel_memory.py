"""Per-rank parameter bytes of the dense part of the MoE transformer against the tensor-parallel size.

For ``tp`` in 1, 2, 4 forked gloo ranks (CPU), the encoder-decoder MoE transformer (untied embeddings by
default) is parallelized with ``tensor_parallel_size=tp`` and nothing else (``dp = 1``, ``ep = 1``, ZeRO
stage 3, which shards nothing with one data-parallel rank), so the numbers show what tensor parallelism
alone divides. Measured on rank 0 with :func:`lightning_moe.parallel.memory.dense_and_expert_parameter_bytes`
(local shards of DTensors):

* ``dense``: every parameter outside the experts; ``ideal`` = the ``tp = 1`` dense bytes / ``tp``;
  ``ratio = dense / ideal``. What stays whole on every rank (layer norms, row-parallel biases, routers,
  learned positions) keeps the ratio above 1. A tied embedding table is split over the vocabulary like
  untied ones (it is both the embedding and the output projection).
* ``split`` / ``replicated``: the dense bytes split over ``tp`` (per rank) and kept whole.
* ``experts``: expert weights per rank; they are not split by tensor parallelism but ZeRO-sharded over
  ``efsdp x tp`` (here ``tp``), so they shrink the same way at rest.

Run from the repository root::

    python benchmarks/tensor_parallel_memory.py                   # d=512, 8 heads, 6+6 layers, 8 experts
    python benchmarks/tensor_parallel_memory.py --tied --layers 2
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import tests.conftest  # noqa: E402,F401 - pre-imports heavy modules once, before forking the ranks
from lightning_moe.models import MoETransformer, get_preset  # noqa: E402
from lightning_moe.parallel import ParallelDims, expert_counts, parallelize  # noqa: E402
from lightning_moe.parallel.memory import dense_and_expert_parameter_bytes, local_bytes  # noqa: E402
from tests.distributed.harness import run_ranks  # noqa: E402

MIB = 2**20


def _model(args: argparse.Namespace) -> MoETransformer:
    config = get_preset(
        "tiny",
        vocab_size=args.vocab,
        d_model=args.hidden,
        num_heads=args.heads,
        ffn_hidden_size=4 * args.hidden,
        encoder_layers=args.layers,
        decoder_layers=args.layers,
        tie_embeddings=args.tied,
        num_experts=args.experts,
        k=2,
    )
    with torch.device("meta"):  # only shapes matter: no initialisation cost
        return MoETransformer(config)


def _measure(rank: int, world_size: int, args: argparse.Namespace) -> dict[str, Any]:
    model = _model(args)
    dims = ParallelDims(world_size, 1, tensor_parallel_size=world_size, zero_stage=3).resolve(expert_counts(model))
    parallelize(model, dims.build_mesh("cpu"), dims)
    dense, experts = dense_and_expert_parameter_bytes(model)
    expert_ids = {id(p) for n, p in model.named_parameters() if ".experts." in n}
    dense_params = [p for p in model.parameters() if id(p) not in expert_ids]

    def is_split(p: torch.Tensor) -> bool:  # sharded over tp (the last mesh dim of a 2-D DTensor)
        return isinstance(p, DTensor) and p.device_mesh.ndim > 1 and p.placements[-1].is_shard()

    split = local_bytes(p for p in dense_params if is_split(p))
    return {"dense": dense, "experts": experts, "split": split, "replicated": dense - split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--layers", type=int, default=6, help="encoder layers = decoder layers")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--tied", action="store_true", help="tie the embeddings and the head (one table)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(
        f"MoE transformer d={args.hidden}, heads={args.heads}, {args.layers}+{args.layers} layers, "
        f"{args.experts} experts, vocab={args.vocab}, {'tied' if args.tied else 'untied'} embeddings"
    )
    print(
        f"{'tp':>3} {'dense MiB':>10} {'ideal MiB':>10} {'ratio':>6} {'split MiB':>10} {'whole MiB':>10} "
        f"{'experts MiB':>12}"
    )
    base = None
    for tp in args.tp:
        row = run_ranks(_measure, tp, args, timeout=600)[0]
        base = row["dense"] if base is None and tp == 1 else base
        if base is None:
            raise SystemExit("--tp must start with 1 (the reference for 'ideal')")
        ideal = base / tp
        print(
            f"{tp:>3} {row['dense'] / MIB:>10.2f} {ideal / MIB:>10.2f} {row['dense'] / ideal:>6.3f} "
            f"{row['split'] / MIB:>10.2f} {row['replicated'] / MIB:>10.2f} {row['experts'] / MIB:>12.2f}"
        )


if __name__ == "__main__":
    main()
