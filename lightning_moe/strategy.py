"""``MoEZeroStrategy``: the Lightning face of :mod:`lightning_moe.parallel`.

Expert parallelism (EP) for the MoE layers, tensor parallelism (TP) for the dense layers, ZeRO stages 0-3 on
FSDP2, optional CPU offload, and checkpoints that reshard (:mod:`lightning_moe.checkpoint`). ``import
lightning_moe`` registers it as ``Trainer(strategy="moe_zero")`` with the presets of :data:`STRATEGY_PRESETS`.
The engine (dims, mesh, parallelize, meta init, optimizer settings, rank health) lives in
:mod:`lightning_moe.parallel`; this module only maps Lightning's hooks onto it::

    setup_environment   process group -> ParallelDims -> device mesh (also ``LightningModule.device_mesh``)
    configure_model     the user's hook, inside the strategy's / precision's init contexts
    setup               parallelize(model, mesh, dims, mp_policy, activation_checkpointing)
                        -> materialise meta weights -> optimizers (offload wrapper) -> precision
    (resume)            load_checkpoint: DCP folder or full file, resharded onto this layout

The checkpoint hooks are a mixin in :mod:`lightning_moe.strategy_checkpoint`, the rank-watched collectives one
in :mod:`lightning_moe.strategy_collectives`.

Not a subclass of Lightning's ``ModelParallelStrategy`` although the hooks follow it: Lightning rejects
``precision="16-mixed"`` for instances of that class.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.distributed import (
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.strategies.parallel import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from lightning_moe.parallel import (
    ParallelDims,
    expert_counts,
    mixed_precision_policy,
    no_gradient_sync,
    offload_optimizer,
    parallelize,
    submesh,
)
from lightning_moe.parallel.dims import mesh_groups
from lightning_moe.parallel.fsdp import is_data_parallel, no_inference_mode
from lightning_moe.parallel.health import RankWatch
from lightning_moe.parallel.init import has_meta_tensors, materialize_meta_model
from lightning_moe.parallel.optim import use_whole_list_update
from lightning_moe.parallel.parallelize import check_not_parallelized
from lightning_moe.precision import moe_zero_precision
from lightning_moe.strategy_checkpoint import CheckpointHooks, unwrap_optimizer
from lightning_moe.strategy_collectives import WatchedCollectives
from lightning_moe.strategy_presets import STRATEGY_PRESETS, SUPPORTED_PRECISIONS, check_strategy_arguments

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["MoEZeroStrategy", "SUPPORTED_PRECISIONS", "STRATEGY_PRESETS", "register_strategies"]

# Set on a model once parallelized: the layout it was parallelized for (a second setup of the same Trainer,
# e.g. fit -> test, must not parallelize it again).
_LAYOUT_ATTR = "_moe_zero_layout"

DEFAULT_TIMEOUT = timedelta(minutes=10)
"""How long a collective waits for a rank that stopped answering (torch's own default for gloo is 30 min)."""


class MoEZeroStrategy(CheckpointHooks, WatchedCollectives, ParallelStrategy):
    """Expert parallelism + ZeRO (FSDP2) + CPU offload for LightningModules with MoE layers.

    The strategy parallelises the model itself (``lightning_moe.parallel.parallelize``): the LightningModule
    only builds it, either in ``__init__`` or in ``configure_model`` (which may use ``self.device_mesh``,
    unless ``expert_parallel_size="auto"`` and the MoE layers are created there: the mesh then depends on
    their expert counts and is built right after ``configure_model``).

    Hugging Face transformers MoE models (Mixtral, Qwen2/3-MoE, OLMoE, ...) held unmodified by the LightningModule
    get the same expert parallelism through their experts implementation, keeping their own routing
    (:mod:`lightning_moe.parallel.hf_moe`; export with :func:`lightning_moe.hf.export_pretrained`).

    A model built under ``Trainer.init_module(empty_init=True)`` (meta device) is materialised after sharding
    with the weights one process would give from the same seed (:mod:`lightning_moe.parallel.init`).

    MoE auxiliary losses are part of the user's loss (``MoEOutput.aux_loss``, added in ``training_step``);
    each rank computes them from its local tokens, and gradients are averaged over the data-parallel ranks
    (docs/INTERFACES.md). Gradient clipping goes through the precision plugin (:mod:`lightning_moe.precision`:
    one norm over the dense and the expert meshes); ``self.log(..., sync_dist=True)`` and the
    ``DistributedSampler`` work as with DDP, the sampler counting data-parallel ranks only (the ``tp`` ranks
    of one data-parallel rank read the same batch).

    Arguments:
        expert_parallel_size: ranks that split one copy of each MoE layer's experts between them. Must divide
            the data-parallel size (world size / ``tensor_parallel_size``) and every MoE layer's expert
            count. ``"auto"``: the largest size that does.
        tensor_parallel_size: ranks that split each dense layer (attention heads, FFN width, tied or
            untied embeddings and head) between them, Megatron-style; the experts' tokens are split over the same
            ranks (``lightning_moe.parallel.tensor_parallel``). Must divide the world size, the attention
            heads and the split widths. Combines with every ``expert_parallel_size``, ZeRO stage and offload.
        zero_stage: 0 = parameters replicated, gradients all-reduced (torch DDP at ep=1); 1 = optimizer state sharded,
            gradients reduced once per optimizer step (not on gradient-accumulation micro-batches); 2 = also
            gradients reduce-scattered every micro-batch; 3 = also parameters sharded between uses.
        offload: ``"none"``; ``"optimizer"`` (optimizer state and step on the CPU, needs ``zero_stage >= 1``);
            ``"params"`` (sharded parameters and gradients on the CPU too, needs ``zero_stage == 3``).
        activation_checkpointing: recompute each block's activations in the backward pass.
        save_distributed_checkpoint: ``True``: a checkpoint is a folder with each rank's shards (loads on any
            other layout). ``False``: rank 0 gathers the full state into one file.
        process_group_backend: ``None`` picks ``"gloo"`` on CPU, ``"nccl"`` on CUDA and
            ``"cuda:nccl,cpu:gloo"`` on CUDA with offload.
        timeout: how long a collective waits for the other ranks (every process group of the mesh gets it)
            before it fails; ``None`` = torch's default (30 min for gloo). A rank that dies is noticed at once
            (its connections close) and one that freezes after ``timeout``; the surviving ranks then raise a
            :class:`~lightning_moe.parallel.health.RankFailureError` naming the rank within a few seconds.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision_plugin: passed to
            ``ParallelStrategy`` (the ``Trainer`` fills them in when left ``None``).
    """

    strategy_name = "moe_zero"

    def __init__(
        self,
        expert_parallel_size: int | Literal["auto"] = "auto",
        zero_stage: int = 2,
        offload: str = "none",
        tensor_parallel_size: int = 1,
        activation_checkpointing: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = DEFAULT_TIMEOUT,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        ParallelDims.check_arguments(
            expert_parallel_size=expert_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            zero_stage=zero_stage,
            offload=offload,
        )
        check_strategy_arguments(
            activation_checkpointing=activation_checkpointing,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._expert_parallel_size = expert_parallel_size
        self._tensor_parallel_size = tensor_parallel_size
        self._zero_stage = zero_stage
        self._offload = offload
        self._activation_checkpointing = activation_checkpointing
        self._save_distributed_checkpoint = save_distributed_checkpoint
        self._process_group_backend: str | None = process_group_backend
        self._timeout: timedelta | None = timeout
        self._rank_watch = RankWatch(timeout, known_dead=self._exited_children)
        self.num_nodes = 1
        self._dims: ParallelDims | None = None
        self._device_mesh: DeviceMesh | None = None
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )

    # --- settings ---
    @property
    def zero_stage(self) -> int:
        """The ZeRO stage (0-3)."""
        return self._zero_stage

    @property
    def offload(self) -> str:
        """``"none"``, ``"optimizer"`` or ``"params"``."""
        return self._offload

    @property
    def expert_parallel_size(self) -> int | Literal["auto"]:
        """The expert-parallel size: the resolved number once the mesh exists, else the argument."""
        if self._dims is not None and self._dims.is_resolved:
            return self._dims.ep
        return self._expert_parallel_size

    @property
    def tensor_parallel_size(self) -> int:
        """Ranks splitting each dense layer (1 = no tensor parallelism)."""
        return self._tensor_parallel_size

    @property
    def activation_checkpointing(self) -> bool:
        """Whether blocks recompute their activations in the backward pass."""
        return self._activation_checkpointing

    @property
    def save_distributed_checkpoint(self) -> bool:
        """``True``: checkpoints are DCP folders; ``False``: one full file from rank 0."""
        return self._save_distributed_checkpoint

    @property
    def parallel_dims(self) -> ParallelDims:
        """The :class:`ParallelDims` of this run (exists once the world size is known)."""
        if self._dims is None:
            raise RuntimeError("The parallel dims are known only once the Trainer has set up the world size.")
        return self._dims

    @property
    def device_mesh(self) -> DeviceMesh:
        """The ``("efsdp", "ep", "tp")`` mesh (``mesh["dp"]`` flattened); exists after ``setup_environment``."""
        if self._device_mesh is None:
            raise RuntimeError("Accessing the device mesh before processes have initialized is not allowed.")
        return self._device_mesh

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        """Processes per node."""
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    @override
    def is_distributed(self) -> bool:
        # Lightning only adds the DistributedSampler and syncs `self.log(sync_dist=True)` when this is True.
        return True

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        if self._device_mesh is not None:
            dp_mesh = submesh(self._device_mesh, "dp")
            return {"num_replicas": dp_mesh.size(), "rank": dp_mesh.get_local_rank()}
        return {"num_replicas": self.num_nodes * self.num_processes, "rank": self.global_rank}

    @property
    def process_group_backend(self) -> str | None:
        """The backend of the default process group (known after ``setup_environment``)."""
        return self._process_group_backend

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return False

    # --- precision ---
    @property  # type: ignore[override]
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else moe_zero_precision(Precision())

    @precision_plugin.setter
    def precision_plugin(self, precision_plugin: Precision | None) -> None:
        # The Trainer builds Lightning's plugin from `precision=...`; ours has the same settings and clips
        # across meshes (lightning_moe.precision). Unsupported precisions fail here, while the Trainer is built.
        self._precision_plugin = None if precision_plugin is None else moe_zero_precision(precision_plugin)

    # --- processes, mesh ---
    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    def set_world_ranks(self) -> None:
        """Set rank and world size on the cluster environment and check the layout against the world size.

        Called by the Trainer while it is built, before any process starts, so a bad ``expert_parallel_size``
        fails there.
        """
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank
        if self.parallel_devices is not None and (self._dims is None or self._dims.world_size != self.world_size):
            self._dims = self._new_dims(self.world_size)

    def _new_dims(self, world_size: int) -> ParallelDims:
        return ParallelDims(
            world_size=world_size,
            expert_parallel_size=self._expert_parallel_size,
            tensor_parallel_size=self._tensor_parallel_size,
            zero_stage=self._zero_stage,
            offload=self._offload,
        )

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = self._get_process_group_backend()
        assert self.cluster_environment is not None
        device_id = self.root_device if self.root_device.type != "cpu" else None
        _init_dist_connection(
            self.cluster_environment, self._process_group_backend, timeout=self._timeout, device_id=device_id
        )
        self._rank_watch.start()
        model = self.lightning_module
        assert model is not None
        if self._device_mesh is not None and self._dims is not None and self._dims.world_size == dist.get_world_size():
            model._device_mesh = self._device_mesh  # a later stage of the same Trainer (fit -> test)
            return
        self._dims = self._new_dims(dist.get_world_size())
        counts = expert_counts(model)
        if counts or self._expert_parallel_size != "auto" or not is_overridden("configure_model", model):
            self._dims = self._dims.resolve(counts)
            self._build_mesh()
        # else: "auto" with the MoE layers created in `configure_model`: the mesh is built in `setup()`

    def _get_process_group_backend(self) -> str:
        if self._process_group_backend is not None:
            return self._process_group_backend
        if self.root_device.type == "cuda" and self._offload != "none":
            return "cuda:nccl,cpu:gloo"  # offloaded tensors (clipping norms, optimizer) meet gloo collectives
        return _get_default_process_group_backend_for_device(self.root_device)

    def _build_mesh(self) -> None:
        assert self._dims is not None and self.lightning_module is not None
        self._device_mesh = self._dims.build_mesh(self.root_device.type)
        self._rank_watch.cover(mesh_groups(self._device_mesh))
        self.lightning_module._device_mesh = self._device_mesh

    # --- setup ---
    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.model is not None and self.accelerator is not None and self._dims is not None
        self.accelerator.setup(trainer)
        # Resolves "auto" when the MoE layers were created in `configure_model`; else checks the expert counts.
        self._dims = self._dims.resolve(expert_counts(self.model))
        if self._device_mesh is None:
            self._build_mesh()

        layout = self._layout()
        done = getattr(self.model, _LAYOUT_ATTR, None)
        if done is None:
            check_not_parallelized(self.model, type(self).__name__)
            self._parallelize_model(layout)
        elif done != layout:
            raise TypeError(
                f"The model was already parallelized for another layout ({done}); this run needs {layout}."
                " Build a fresh LightningModule (or load a checkpoint into one) for the new layout."
            )
        # else: a second stage of the same Trainer (fit -> validate/test/predict): already parallelized
        self.barrier()

        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING and self._offload == "none":
            _optimizers_to_device(self.optimizers, self.root_device)

    def _layout(self) -> tuple[Any, ...]:
        assert self._dims is not None
        return (
            ("world_size", self._dims.world_size),
            ("expert_parallel_size", self._dims.ep),
            ("tensor_parallel_size", self._dims.tp),
            ("zero_stage", self._zero_stage),
            ("offload", self._offload),
            ("precision", self.precision_plugin.precision),
            ("activation_checkpointing", self._activation_checkpointing),
        )

    def _parallelize_model(self, layout: tuple[Any, ...]) -> None:
        """Precision conversion -> device -> ``parallelize`` -> materialise meta weights (once per model)."""
        assert self.model is not None and self._dims is not None
        self.model = self.precision_plugin.convert_module(self.model)  # bf16-true: weights in bf16
        if self._offload != "params" and not has_meta_tensors(self.model):
            self.model_to_device()
        parallelize(
            self.model,
            self.device_mesh,
            self._dims,
            mp_policy=mixed_precision_policy(self.precision_plugin.precision),
            activation_checkpointing=self._activation_checkpointing,
        )
        # Meta-device weights (`Trainer.init_module(empty_init=True)`): each rank allocates its shards and fills
        # them as one process would (the model's `init_weights()` / `reset_parameters()`, rank 0's seed).
        materialize_meta_model(self.model, torch.device("cpu") if self._offload == "params" else self.root_device)
        setattr(self.model, _LAYOUT_ATTR, layout)

    @override
    def setup_optimizers(self, trainer: Trainer) -> None:
        # after a re-setup (fit -> validate) the model was re-wrapped: drop optimizers pointing to old params
        self._reset_optimizers_and_schedulers()
        super().setup_optimizers(trainer)
        if self._offload == "optimizer":
            self.optimizers = [offload_optimizer(opt) for opt in self.optimizers]
        for optimizer in self.optimizers:
            use_whole_list_update(unwrap_optimizer(optimizer))

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        # `empty_init=True` (Trainer.init_module(empty_init=True)): meta tensors, materialised in `setup()`
        with torch.device("meta") if empty_init else nullcontext(), self.precision_plugin.tensor_init_context():
            yield

    # --- training loop integration ---
    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Context for a gradient-accumulation micro-batch that is not the last one of an optimizer step
        (what each ZeRO stage skips: ``lightning_moe.parallel.fsdp.no_gradient_sync``)."""
        if self.model is None or not is_data_parallel(self.model):
            yield None
            return
        with no_gradient_sync(self.model, self._zero_stage):
            yield None

    def _run_step(self, name: str, context: Any, *args: Any, **kwargs: Any) -> Any:
        assert self.lightning_module is not None and self.model is not None
        with self._watch(name), context:
            if is_data_parallel(self.model):
                # The LightningModule is itself the FSDP (or, at stage 0, DDP) root: call the step through its
                # `forward` so the root hooks run (FSDP: all-gather of root-level parameters, input casting;
                # DDP: preparing the gradient buckets for backward).
                return self._forward_redirection(self.model, self.lightning_module, name, *args, **kwargs)
            return getattr(self.lightning_module, name)(*args, **kwargs)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._run_step("training_step", self.precision_plugin.train_step_context(), *args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with no_inference_mode():
            return self._run_step("validation_step", self.precision_plugin.val_step_context(), *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with no_inference_mode():
            return self._run_step("test_step", self.precision_plugin.test_step_context(), *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with no_inference_mode():
            return self._run_step("predict_step", self.precision_plugin.predict_step_context(), *args, **kwargs)

    @override
    def teardown(self) -> None:
        assert self.cluster_environment is not None and self.accelerator is not None
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, init_params in STRATEGY_PRESETS.items():
            args = ", ".join(f"{k}={v!r}" for k, v in init_params.items())
            description = f"Expert parallelism + ZeRO via FSDP2 ({args})"
            strategy_registry.register(name, cls, description=description, override=True, **init_params)


def register_strategies(registry: _StrategyRegistry | None = None) -> None:
    """Register ``moe_zero`` and its presets (:data:`STRATEGY_PRESETS`) with Lightning's strategy registry.

    Idempotent (``override=True``); ``import lightning_moe`` arranges for it to run.
    """
    MoEZeroStrategy.register_strategies(StrategyRegistry if registry is None else registry)


# Idempotent; covers `import lightning_moe.strategy` before Lightning (the package hook then finds this module
# still loading and leaves the registration to it).
register_strategies()
