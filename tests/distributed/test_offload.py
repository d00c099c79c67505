"""CPUOffloadAdamW (ZeRO-Offload's optimizer) == torch.optim.AdamW, single process."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from lightning_moe.parallel.offload import CPUOffloadAdamW, offload_optimizer


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(5, 3), (7,), (2, 2, 2)]]


def _run(optimizer_fn, steps: int = 4, skip_grad_of: int | None = None) -> list[torch.Tensor]:
    params = _params()
    opt = optimizer_fn(params)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (i == skip_grad_of and step % 2) else torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("implementation", ["fused", "foreach", "for-loop"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_matches_adamw(implementation: str, amsgrad: bool) -> None:
    kwargs = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=amsgrad)
    expected = _run(lambda ps: torch.optim.AdamW(ps, **kwargs), skip_grad_of=1)
    actual = _run(lambda ps: CPUOffloadAdamW(ps, implementation=implementation, **kwargs), skip_grad_of=1)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_parameter_groups_and_maximize() -> None:
    def groups(ps):
        return [{"params": ps[:2], "lr": 0.1}, {"params": ps[2:], "lr": 0.01, "weight_decay": 0.0}]

    expected = _run(lambda ps: torch.optim.AdamW(groups(ps), maximize=True))
    actual = _run(lambda ps: CPUOffloadAdamW(groups(ps), maximize=True))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_state_lives_on_cpu_in_fp32_and_state_dict_round_trips() -> None:
    params = _params()
    opt = CPUOffloadAdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    for state in opt.state.values():
        assert state["exp_avg"].device.type == "cpu" and state["exp_avg"].dtype == torch.float32
    saved = copy.deepcopy(opt.state_dict())  # as if saved to a file (state_dict() shares the tensors)

    # Continue the original, and a fresh optimizer loaded from the state dict: same result.
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin_opt = CPUOffloadAdamW(twin, lr=0.1)
    twin_opt.load_state_dict(saved)
    for p, q in zip(params, twin):
        p.grad = torch.full_like(p, 0.5)
        q.grad = p.grad.clone()
    opt.step()
    twin_opt.step()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q)
    assert twin_opt.state[twin[0]]["step"].item() == 2


def test_parameters_changed_outside_the_optimizer_are_picked_up() -> None:
    # E.g. a checkpoint loaded into the model after the first step: the CPU master must follow.
    params, ref_params = _params(), _params()
    opt, ref = CPUOffloadAdamW(params, lr=0.1), torch.optim.AdamW(ref_params, lr=0.1)
    for step in range(3):
        for p, q in zip(params, ref_params):
            p.grad = torch.ones_like(p)
            q.grad = torch.ones_like(q)
        if step == 1:
            with torch.no_grad():
                for p, q in zip(params, ref_params):
                    p.mul_(0.5)
                    q.mul_(0.5)
        opt.step()
        ref.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_offload_optimizer_shares_param_groups_with_the_original() -> None:
    params = _params()
    original = torch.optim.AdamW(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(original, step_size=1, gamma=0.5)
    offloaded = offload_optimizer(original)
    assert offloaded.param_groups[0] is original.param_groups[0]
    for p in params:
        p.grad = torch.ones_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        offloaded.step()
        scheduler.step()  # the scheduler still drives the learning rate
    assert offloaded.param_groups[0]["lr"] == pytest.approx(0.05)


def test_offload_optimizer_rejects_other_optimizers() -> None:
    with pytest.raises(ValueError, match=r"offload='optimizer' supports torch.optim.AdamW.*got SGD"):
        offload_optimizer(torch.optim.SGD(_params(), lr=0.1))
    with pytest.raises(ValueError, match="Adam without L2 weight decay"):
        offload_optimizer(torch.optim.Adam(_params(), lr=0.1, weight_decay=0.1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(implementation="cuda"), "implementation='cuda'"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CPUOffloadAdamW(_params(), **kwargs)
