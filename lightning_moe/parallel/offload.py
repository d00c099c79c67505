"""ZeRO-Offload for the optimizer: parameters stay on the device, the optimizer lives on the CPU.

:class:`CPUOffloadAdamW` keeps, for every parameter's local shard, an fp32 CPU master copy and the
AdamW moments on the CPU. Each step copies the local gradient shard to the CPU, runs a fused (or
foreach) CPU AdamW on the master copies, and copies the updated masters back into the device
parameters. On a CPU-only machine the same path runs (the "device" is the CPU, the copies are real).

The optimizer's ``param_groups`` are the model's parameters (DTensor shards under FSDP) and its state is
keyed by them, with DTensor moments on the parameter's mesh and placements whose local tensors are on
the CPU: ``torch.distributed.checkpoint`` saves and reshards it like any optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.optim import Optimizer
from torch.optim.adamw import adamw

from lightning_moe.parallel.local import local_shard

__all__ = ["CPUOffloadAdamW", "offload_optimizer"]

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_IMPLEMENTATIONS = ("fused", "foreach", "for-loop")


def _like_param(local_cpu: Tensor, param: Tensor) -> Tensor:
    """Wrap a CPU local tensor as ``param`` is wrapped (same mesh, placements, global shape).

    Built from a spec rather than ``DTensor.from_local``, which moves the local tensor to the mesh's device
    type (CUDA on a GPU mesh); the state must stay in host memory, as FSDP2's offloaded parameters do."""
    if isinstance(param, DTensor):
        meta = TensorMeta(param.shape, param.stride(), local_cpu.dtype)
        spec = DTensorSpec(param.device_mesh, tuple(param.placements), tensor_meta=meta)
        return DTensor(local_cpu, spec, requires_grad=False)  # type: ignore[call-arg]
    return local_cpu


def _pin_memory() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _synchronize(device: torch.device) -> None:
    if device.type == "cpu":
        return
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "synchronize"):
        accelerator.synchronize(device)
    elif device.type == "cuda":
        torch.cuda.synchronize(device)


class CPUOffloadAdamW(Optimizer):
    """AdamW whose state and update run on the CPU in fp32 (ZeRO-Offload).

    Same hyper-parameters and results as ``torch.optim.AdamW`` (up to float rounding).

    Args:
        params: parameters or parameter groups (dicts are used as they are: passing another
            optimizer's ``param_groups`` shares them, so its LR schedulers keep working).
        lr, betas, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.AdamW``.
        implementation: ``"fused"`` (default when torch has a fused CPU AdamW), ``"foreach"`` or
            ``"for-loop"``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        implementation: str | None = None,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"lr={lr!r} must be >= 0")
        if not eps >= 0:
            raise ValueError(f"eps={eps!r} must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas={betas!r} must both be in [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
        if implementation is None:
            implementation = "fused" if hasattr(torch, "_fused_adamw_") else "foreach"
        if implementation not in _IMPLEMENTATIONS:
            raise ValueError(f"implementation={implementation!r} is not supported; use one of {list(_IMPLEMENTATIONS)}")
        self.implementation = implementation
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults)
        self._masters: dict[Tensor, Tensor] = {}  # param -> fp32 CPU copy of its local shard
        self._master_versions: dict[Tensor, int] = {}  # local shard's version when the master was synced
        self._grad_buffers: dict[Tensor, Tensor] = {}  # param -> CPU fp32 staging buffer for its grad

    # ----------------------------------------------------------------------------------------------
    def _master(self, param: Tensor) -> Tensor:
        """The fp32 CPU master of ``param``'s local shard, refreshed if the parameter was changed
        outside this optimizer (e.g. a checkpoint was loaded into the model)."""
        local = local_shard(param)
        master = self._masters.get(param)
        if master is None or self._master_versions.get(param) != local._version:
            master = local.detach().to("cpu", torch.float32, copy=True)
            self._masters[param] = master
            self._master_versions[param] = local._version
        return master

    def _grad_on_cpu(self, param: Tensor) -> Tensor:
        grad = local_shard(param.grad)  # type: ignore[arg-type]
        buffer = self._grad_buffers.get(param)
        if buffer is None or buffer.shape != grad.shape:
            buffer = torch.empty(grad.shape, dtype=torch.float32, device="cpu", pin_memory=_pin_memory())
            self._grad_buffers[param] = buffer
        buffer.copy_(grad, non_blocking=True)
        return buffer

    def _init_state(self, param: Tensor, master: Tensor, amsgrad: bool) -> dict[str, Tensor]:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = _like_param(torch.zeros_like(master), param)
            state["exp_avg_sq"] = _like_param(torch.zeros_like(master), param)
            if amsgrad:
                state["max_exp_avg_sq"] = _like_param(torch.zeros_like(master), param)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One AdamW step on the CPU for every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise ValueError("CPUOffloadAdamW does not support sparse gradients; use dense gradients")
            masters = [self._master(p) for p in params]
            grads = [self._grad_on_cpu(p) for p in params]
            for device in {local_shard(p).device for p in params}:
                _synchronize(device)  # the non-blocking device-to-host copies have landed
            states = [self._init_state(p, m, group["amsgrad"]) for p, m in zip(params, masters)]
            beta1, beta2 = group["betas"]
            adamw(
                masters,
                grads,
                [local_shard(s["exp_avg"]) for s in states],
                [local_shard(s["exp_avg_sq"]) for s in states],
                [local_shard(s["max_exp_avg_sq"]) for s in states] if group["amsgrad"] else [],
                [s["step"] for s in states],
                foreach=self.implementation == "foreach",
                fused=self.implementation == "fused",
                amsgrad=group["amsgrad"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
            )
            for p, master in zip(params, masters):
                local = local_shard(p)
                local.copy_(master, non_blocking=True)
                self._master_versions[p] = local._version
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like ``Optimizer.load_state_dict``, then put the state back on the CPU in fp32."""
        super().load_state_dict(state_dict)
        for param, state in self.state.items():
            for key in _MOMENTS:
                if key in state:
                    cpu = local_shard(state[key]).detach().to("cpu", torch.float32)
                    state[key] = _like_param(cpu, param)
            if "step" in state:
                state["step"] = local_shard(state["step"]).detach().to("cpu", torch.float32).reshape(())
        self._masters.clear()
        self._master_versions.clear()


def offload_optimizer(optimizer: Optimizer) -> CPUOffloadAdamW:
    """A :class:`CPUOffloadAdamW` that takes over ``optimizer``'s parameter groups (shared dicts).

    Only ``torch.optim.AdamW`` (or ``Adam`` without weight decay, which is the same update) can be
    offloaded, before its first step. LR schedulers created for ``optimizer`` keep working (the groups,
    and so the learning rates, are shared).
    """
    if isinstance(optimizer, CPUOffloadAdamW):
        return optimizer
    is_adamw = isinstance(optimizer, torch.optim.AdamW)
    is_adam_plain = type(optimizer) is torch.optim.Adam and all(
        g.get("weight_decay", 0) == 0 or g.get("decoupled_weight_decay", False) for g in optimizer.param_groups
    )
    if not (is_adamw or is_adam_plain):
        raise ValueError(
            f"offload='optimizer' supports torch.optim.AdamW (or Adam without L2 weight decay), got "
            f"{type(optimizer).__name__}; return AdamW from configure_optimizers or use offload='none'/'params'"
        )
    if any(optimizer.state.values()):
        raise ValueError("offload_optimizer must wrap the optimizer before its first step (it already has state)")
    for g in optimizer.param_groups:
        if isinstance(g["lr"], Tensor):
            g["lr"] = float(g["lr"])
        g.setdefault("maximize", False)
        g.setdefault("amsgrad", False)
    offloaded = CPUOffloadAdamW(optimizer.param_groups)
    # LR schedulers built on the original keep driving the shared groups; they also check that the
    # original's step ran before theirs, so mark it as having run whenever the offloaded one steps.
    offloaded.register_step_post_hook(lambda *_: setattr(optimizer, "_opt_called", True))
    return offloaded
