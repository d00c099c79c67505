"""``precision="16-mixed"`` (CUDA only) relies on Lightning's ``torch.amp.GradScaler`` working on FSDP2
DTensor gradients that live on several meshes (dense on ``dp``, experts on ``efsdp``): an overflow in one
rank's gradient shard must make *every* rank skip the step and lower the scale, or the ranks diverge.
Checked here on CPU with the CPU scaler and the same DTensor code path.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.distributed


def _step_with_overflow_on_rank_1(rank: int, world_size: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    dense_mesh = init_device_mesh("cpu", (world_size,))
    other_mesh = init_device_mesh("cpu", (world_size,))  # a second mesh object, like the experts' one
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    fully_shard(model[0], mesh=other_mesh)
    fully_shard(model, mesh=dense_mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    results = {}
    for step, overflow in enumerate((True, False)):
        scaler.scale(model(torch.randn(2, 4)).sum()).backward()
        if overflow and rank == 1:
            model[1].weight.grad._local_tensor.view(-1)[0] = float("inf")  # only rank 1's shard overflows
        before = [p.full_tensor().clone() for p in model.parameters()]
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        after = [p.full_tensor().clone() for p in model.parameters()]
        results[step] = {"stepped": [not torch.equal(a, b) for a, b in zip(before, after)], "scale": scaler.get_scale()}
    return results


def test_gradient_scaler_skips_on_every_rank_when_one_shard_overflows() -> None:
    out = run_ranks(_step_with_overflow_on_rank_1, 2, timeout=60)
    for rank_result in out:
        assert rank_result[0] == {"stepped": [False] * 4, "scale": 512.0}  # skipped everywhere, scale halved
        assert all(rank_result[1]["stepped"]) and rank_result[1]["scale"] == 512.0  # then a normal step
