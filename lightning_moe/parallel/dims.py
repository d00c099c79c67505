"""Parallel dimensions: how the ranks are split between data, expert and tensor parallelism.

Mesh layout (outermost first)::

    ("efsdp", "ep", "tp")      and the flattened  "dp" = ("efsdp", "ep")

* ``tp`` (tensor parallel) is innermost, then ``ep``: an expert-parallel group is a run of
  contiguous data-parallel ranks (ranks 0..ep-1 hold all experts between them, then ep..2ep-1, ...).
* ``efsdp = dp / ep``: the ranks holding the *same* experts; expert weights are ZeRO-sharded over it.
* ``dp = efsdp * ep``: every data-parallel rank; dense weights are ZeRO-sharded over it.
* ``efsdp_tp = efsdp x tp`` (flattened, only built when ``tp > 1``): experts are not split by tensor
  parallelism (each ``tp`` rank runs ``1/tp`` of their tokens, see ``tensor_parallel.py``), so their weights
  are ZeRO-sharded over these ranks, and their partial gradients summed there (:func:`expert_shard_mesh`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = [
    "ParallelDims",
    "submesh",
    "expert_shard_mesh",
    "mesh_groups",
    "ZERO_STAGES",
    "OFFLOAD_CHOICES",
    "MESH_DIM_NAMES",
]

ZERO_STAGES = (0, 1, 2, 3)
OFFLOAD_CHOICES = ("none", "optimizer", "params")
MESH_DIM_NAMES = ("efsdp", "ep", "tp")
"""The dims of the mesh built by :meth:`ParallelDims.build_mesh`; ``"dp"`` is ``efsdp x ep`` flattened."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class ParallelDims:
    """How ``world_size`` ranks are split, and how much ZeRO sharding / offloading to apply.

    Immutable and validated on construction (``ValueError`` naming the field and a valid choice).
    ``expert_parallel_size="auto"`` becomes a number in the object :meth:`resolve` returns; only resolved
    dims build a mesh or parallelize a model.
    """

    world_size: int
    """Total number of ranks (``torch.distributed.get_world_size()``)."""

    expert_parallel_size: int | Literal["auto"] = 1
    """Ranks that split one copy of every MoE layer's experts between them (EP). Must divide the
    data-parallel size and every MoE layer's expert count. ``"auto"``: the largest size that does,
    fixed by :meth:`resolve`."""

    tensor_parallel_size: int = 1
    """Ranks splitting each dense weight (TP, the innermost mesh axis). Must divide ``world_size``; the
    ``tp`` ranks of one data-parallel rank read the same batch. Works with every expert-parallel size,
    ZeRO stage and offload choice. Whether it divides the model's heads and widths is checked when the
    model is parallelized (:func:`lightning_moe.parallel.tensor_parallel.apply_tensor_parallel`)."""

    zero_stage: int = 3
    """ZeRO stage: 0 = replicated parameters, gradients all-reduced (DDP-like); 1 = optimizer state
    sharded, gradient reduction deferred to the optimizer step; 2 = + gradients reduce-scattered every
    micro-batch; 3 = + parameters sharded between uses (resharded after forward)."""

    offload: str = "none"
    """``"none"``; ``"optimizer"`` (ZeRO-Offload: parameters stay on the device, the optimizer state and
    step live on the CPU; needs ``zero_stage >= 1`` so that each rank offloads only its shard);
    ``"params"`` (sharded parameters, gradients and the optimizer step on the CPU, copied to the device
    for each use; needs ``zero_stage == 3``, the only stage that does not keep unsharded parameters on
    the device between forward and backward)."""

    @staticmethod
    def check_arguments(
        *, expert_parallel_size: Any = 1, tensor_parallel_size: Any = 1, zero_stage: Any = 3, offload: Any = "none"
    ) -> None:
        """Check the choices that do not depend on the world size (the one place that does; the strategy
        calls it before the world size is known)."""
        ep = expert_parallel_size
        if ep != "auto" and not _is_positive_int(ep):
            raise ValueError(
                f"expert_parallel_size={ep!r} must be a positive integer or 'auto' (a size dividing the"
                " data-parallel size and every MoE layer's expert count)"
            )
        if not _is_positive_int(tensor_parallel_size):
            raise ValueError(
                f"tensor_parallel_size={tensor_parallel_size!r} must be a positive integer dividing the world size"
                " and the model's attention heads and layer widths (1 = no tensor parallelism)"
            )
        if isinstance(zero_stage, bool) or zero_stage not in ZERO_STAGES:
            raise ValueError(f"zero_stage={zero_stage!r} is not a ZeRO stage; use one of {list(ZERO_STAGES)}")
        if not isinstance(offload, str) or offload not in OFFLOAD_CHOICES:
            raise ValueError(f"offload={offload!r} is not supported; use one of {list(OFFLOAD_CHOICES)}")
        if offload == "optimizer" and zero_stage < 1:
            raise ValueError(
                "offload='optimizer' needs zero_stage >= 1 (each rank offloads its shard of the optimizer "
                "state); set zero_stage to 1, 2 or 3, or offload='none'"
            )
        if offload == "params" and zero_stage != 3:
            raise ValueError(
                f"offload='params' needs zero_stage=3 (stages 1-2 keep unsharded parameters on the device "
                f"between forward and backward), got zero_stage={zero_stage}; set zero_stage=3, "
                f"or use offload='optimizer'"
            )

    def __post_init__(self) -> None:
        if not _is_positive_int(self.world_size):
            raise ValueError(f"world_size={self.world_size!r} must be a positive integer (the number of ranks)")
        self.check_arguments(
            expert_parallel_size=self.expert_parallel_size,
            tensor_parallel_size=self.tensor_parallel_size,
            zero_stage=self.zero_stage,
            offload=self.offload,
        )
        if self.world_size % self.tensor_parallel_size != 0:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} does not divide world_size={self.world_size}; "
                f"use one of {_divisors(self.world_size)}"
            )
        if self.expert_parallel_size != "auto":
            self._check_ep_divides_dp(int(self.expert_parallel_size))

    # ----------------------------------------------------------------------------------------------
    @property
    def data_parallel_size(self) -> int:
        """Ranks that see different data: ``world_size / tensor_parallel_size``."""
        return self.world_size // self.tensor_parallel_size

    @property
    def is_resolved(self) -> bool:
        """Whether ``expert_parallel_size`` is a number (not ``"auto"``)."""
        return self.expert_parallel_size != "auto"

    @property
    def ep(self) -> int:
        """The expert-parallel size; raises if still ``"auto"``."""
        self._require_resolved("ep")
        return int(self.expert_parallel_size)  # type: ignore[arg-type]

    @property
    def efsdp(self) -> int:
        """Ranks sharing the same experts (expert weights are ZeRO-sharded over them): ``dp / ep``."""
        return self.data_parallel_size // self.ep

    @property
    def tp(self) -> int:
        """The tensor-parallel size."""
        return self.tensor_parallel_size

    def _require_resolved(self, what: str) -> None:
        if not self.is_resolved:
            raise ValueError(
                f"expert_parallel_size='auto' is not resolved yet ({what} needs a number); "
                "call dims.resolve(num_experts=[...]) with every MoE layer's expert count first"
            )

    def _check_ep_divides_dp(self, ep: int) -> None:
        dp = self.data_parallel_size
        if dp % ep != 0:
            raise ValueError(
                f"expert_parallel_size={ep} does not divide the data-parallel size {dp}; use one of {_divisors(dp)}"
            )

    def resolve(self, num_experts: int | Iterable[int]) -> ParallelDims:
        """The resolved dims: ``"auto"`` fixed, and the expert-parallel size checked against every MoE
        layer's expert count.

        Args:
            num_experts: the expert count of every MoE layer (or one count). Empty: no MoE layer, so
                ``"auto"`` resolves to 1.

        Returns:
            A new :class:`ParallelDims` when ``"auto"`` was fixed, else ``self`` (checked).
        """
        counts = [num_experts] if isinstance(num_experts, int) else list(num_experts)
        for i, count in enumerate(counts):
            if not _is_positive_int(count):
                raise ValueError(f"num_experts[{i}]={count!r} must be a positive integer")
        dp = self.data_parallel_size
        valid = [d for d in _divisors(dp) if all(c % d == 0 for c in counts)]
        if self.expert_parallel_size == "auto":
            return replace(self, expert_parallel_size=max(valid) if counts else 1)
        ep = self.ep
        for i, count in enumerate(counts):
            if count % ep != 0:
                raise ValueError(
                    f"expert_parallel_size={ep} does not divide num_experts={count} of MoE layer {i}; "
                    f"use one of {valid} (sizes dividing the data-parallel size {dp} and every expert count)"
                )
        return self

    def build_mesh(self, device_type: str = "cpu") -> DeviceMesh:
        """The ``("efsdp", "ep", "tp")`` device mesh, plus a flattened ``"dp"`` = ``("efsdp", "ep")``
        (get the 1-D meshes with :func:`submesh`).

        Needs an initialised default process group of ``world_size`` ranks. Every rank must call it.
        """
        self._require_resolved("build_mesh")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("build_mesh needs an initialised process group; call torch.distributed.init_process_group")
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"world_size={self.world_size} but the process group has {dist.get_world_size()} ranks; "
                f"use world_size={dist.get_world_size()}"
            )
        mesh = init_device_mesh(device_type, (self.efsdp, self.ep, self.tp), mesh_dim_names=MESH_DIM_NAMES)
        mesh["efsdp", "ep"]._flatten("dp")
        if self.tp > 1:
            mesh["efsdp", "tp"]._flatten("efsdp_tp")
        return mesh


def submesh(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """The 1-D sub-mesh ``name`` of a mesh built by :meth:`ParallelDims.build_mesh`.

    ``name`` is one of ``"efsdp"``, ``"ep"``, ``"tp"``, ``"dp"`` (``efsdp x ep`` flattened) or ``"efsdp_tp"``
    (``efsdp x tp`` flattened). Use this instead of ``mesh["dp"]``: slicing a flattened dim out of the root
    mesh is deprecated from torch 2.11; re-flattening returns the cached flattened mesh (no new process group).
    """
    if name == "dp":
        return mesh["efsdp", "ep"]._flatten("dp")
    if name == "efsdp_tp":
        return mesh["efsdp", "tp"]._flatten("efsdp_tp")
    if name not in MESH_DIM_NAMES:
        raise ValueError(f"mesh dim {name!r} does not exist; use one of {[*MESH_DIM_NAMES, 'dp', 'efsdp_tp']}")
    return mesh[name]


def expert_shard_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The ranks that ZeRO-shard the expert weights: ``efsdp``, or ``efsdp x tp`` when ``tp > 1``.

    Under tensor parallelism the experts are replicated over ``tp`` and each ``tp`` rank computes a share
    of their tokens, so their gradients are summed over ``tp`` as well as ``efsdp``: sharding them over
    both gives that reduction and ``1/tp`` of the expert memory per rank.
    """
    return submesh(mesh, "efsdp_tp") if mesh["tp"].size() > 1 else submesh(mesh, "efsdp")


def mesh_groups(mesh: DeviceMesh) -> list[dist.ProcessGroup]:
    """The process groups of every dim of ``mesh``, the flattened ones included (``dp``, ``efsdp_tp``)."""
    names = [*(mesh.mesh_dim_names or ()), "dp"] + (["efsdp_tp"] if mesh["tp"].size() > 1 else [])
    return [submesh(mesh, name).get_group() for name in names]
