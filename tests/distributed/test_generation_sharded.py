"""Generation on a sharded model (ZeRO-3 + expert parallelism) equals generation on the unsharded one.

``encode``/``decode_step`` are not ``forward``: the parallel code registers them as FSDP forward methods,
and the decoding loops keep every rank stepping until all are done, so ranks that finish at different
steps do not hang the collectives.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from lightning_moe.models import MoETransformer, beam_search, greedy_decode
from lightning_moe.parallel import ParallelDims, parallelize
from tests.distributed.harness import run_ranks
from tests.small_models import small_config

pytestmark = pytest.mark.distributed

VOCAB, PAD, BOS, EOS = 40, 0, 2, 3


def _model(capacity: bool = False) -> MoETransformer:
    """``capacity``: a model whose experts drop in evaluation (generation routes every token all the same)."""
    torch.manual_seed(0)
    drops = dict(drop_tokens=True, eval_drop_tokens=True, eval_capacity_factor=0.5, min_capacity=0) if capacity else {}
    cfg = small_config(VOCAB, 4, ffn_hidden_size=32, max_positions=48, **drops)
    return MoETransformer(cfg).eval()


def _sources(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    lengths = [3 + rank, 7, 5 - rank]  # different lengths per rank: decoding ends at different steps
    src = torch.full((3, 8), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n] = torch.randint(5, VOCAB, (n,), generator=g)
    return src, src == PAD


def _all_done(local_done: bool) -> bool:
    flag = torch.tensor([0.0 if local_done else 1.0])
    dist.all_reduce(flag)
    return float(flag) == 0.0


def _decode_sharded(rank: int, world_size: int, zero_stage: int, ep: int, capacity: bool = False) -> tuple[list, list]:
    model = _model(capacity)
    reference = copy.deepcopy(model)
    dims = ParallelDims(world_size, expert_parallel_size=ep, zero_stage=zero_stage).resolve([4, 4, 4, 4])
    parallelize(model, dims.build_mesh("cpu"), dims)
    src, mask = _sources(rank)
    ids = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len_a=1.0, max_len_b=4)
    greedy = greedy_decode(model, src, mask, sync_done=_all_done, **ids)
    beams = beam_search(model, src, mask, beam_size=3, sync_done=_all_done, **ids)
    expected_greedy = greedy_decode(reference, src, mask, **ids)
    expected_beams = beam_search(reference, src, mask, beam_size=3, **ids)
    assert greedy == expected_greedy
    assert [[h.tokens for h in s] for s in beams] == [[h.tokens for h in s] for s in expected_beams]
    return greedy, [len(t) for t in greedy]


@pytest.mark.parametrize(("zero_stage", "ep"), [(0, 1), (0, 2), (3, 2)], ids=["stage0-ddp", "stage0-ep2", "stage3-ep2"])
def test_generation_on_sharded_model_equals_unsharded(zero_stage, ep):
    results = run_ranks(_decode_sharded, 2, zero_stage, ep, timeout=120)
    assert len(results) == 2


def test_generation_of_a_model_with_eval_capacity_on_expert_parallel_ranks_equals_unsharded():
    """Generation routes every token (``dropless_routing``) also through the expert-parallel dispatcher of a model
    configured to drop in evaluation. Both sides apply any capacity to the same local tokens, so this checks the
    dropless path under EP, not batch independence (``tests/unit/test_generation_capacity.py`` does that)."""
    results = run_ranks(_decode_sharded, 2, 3, 2, True, timeout=120)
    assert len(results) == 2
