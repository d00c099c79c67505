"""The MoE layer: router -> dispatch plan -> grouped experts -> weighted combine (+ residual MoE)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_moe.moe.balance import AUX_LOSS_SCOPES, BalanceStatistics
from lightning_moe.moe.dispatch import compute_capacity, permute_tokens, plan_dispatch, unpermute_tokens
from lightning_moe.moe.experts import ACTIVATIONS, build_experts
from lightning_moe.moe.kernels.gradient_memory import gradient_memory_of
from lightning_moe.moe.router import TopKRouter, normalize_noisy_gate_policy, router_losses
from lightning_moe.moe.token_dispatcher import TokenDispatcher

__all__ = ["MoE", "MoEOutput", "MoEStats", "find_moe_layers", "dropless_routing", "DROP_POLICIES"]

DROP_POLICIES = ("position", "probs")
"""Which assignments an expert over capacity keeps: by position (choice rank, then token order or a random
order with ``use_rts``) or by router probability (the highest first)."""


class MoEOutput(NamedTuple):
    """What :class:`MoE` returns; unpacks like DeepSpeed's ``output, l_aux, exp_counts``.

    Attributes:
        output: ``[..., hidden_size]`` in the input's dtype (also under autocast).
        aux_loss: fp32 scalar, ``aux_loss_coef * balance + z_loss_coef * z_loss``, to add to the loss.
        expert_counts: ``[E]`` long, tokens routed to each expert before capacity (padding excluded).
    """

    output: Tensor
    aux_loss: Tensor
    expert_counts: Tensor


@dataclass
class MoEStats:
    """Detached statistics of one forward pass, for logging.

    Attributes:
        tokens_per_expert: ``[E]`` assignments kept by each expert (after capacity).
        dropped_fraction: fraction of routed assignments dropped by capacity.
        router_entropy: mean entropy of the router distribution (nats; ``log E`` is uniform).
        balance_loss: the unweighted load-balancing loss (1.0 when perfectly balanced).
        z_loss: the unweighted router z-loss.
        routed_per_expert: ``[E]`` assignments routed to each expert (before capacity).
        num_assignments: routed assignments before capacity (``k`` x real tokens).
    """

    tokens_per_expert: Tensor
    dropped_fraction: Tensor
    router_entropy: Tensor
    balance_loss: Tensor
    z_loss: Tensor
    routed_per_expert: Tensor | None = None
    num_assignments: int = 0


class _DenseFFN(nn.Module):
    """``fc2(act(fc1 x))`` (``kind="ffn"``, with biases) or ``fc2(act(fc1 x) * fc3 x)`` (``"glu"``, no
    biases): the dense branch of a residual MoE, and the shared experts."""

    tensor_parallel_plan = {"fc1": "colwise", "fc3": "colwise", "fc2": "rowwise"}
    """How tensor parallelism splits the layers (plain data, read by ``lightning_moe.parallel``)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str, kind: str = "ffn") -> None:
        super().__init__()
        bias = kind == "ffn"
        self.fc1 = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.fc3: nn.Linear | None = nn.Linear(hidden_size, ffn_hidden_size, bias=False) if kind == "glu" else None
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)
        self.activation = activation

    def reset_parameters(self) -> None:
        for linear in (self.fc1, self.fc2, self.fc3):
            if linear is not None:
                linear.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        h = ACTIVATIONS[self.activation](self.fc1(x))  # [..., H]
        if self.fc3 is not None:
            h = h * self.fc3(x)
        return self.fc2(h)


class MoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer (argument names follow ``deepspeed.moe.layer.MoE``).

    Args:
        hidden_size: model width d.
        num_experts: E, the number of experts.
        ffn_hidden_size: inner width of each expert (and of the residual dense FFN).
        k: experts per token (top-k routing; 1 = Switch, 2 = GShard).
        expert: ``"ffn"`` (two linear layers), ``"glu"`` (SwiGLU), or an ``nn.Module`` mapping
            ``[n, d] -> [n, d]`` to replicate ``E`` times (slower path).
        activation: activation of the experts (default gelu for ``"ffn"``, silu for ``"glu"``).
        capacity_factor: capacity in training, as a multiple of the even share ``k*T/E``.
        eval_capacity_factor: the same in evaluation.
        min_capacity: the smallest capacity of an expert.
        drop_tokens: drop assignments over capacity; False routes every token (dropless).
        eval_drop_tokens: with ``drop_tokens``, drop over ``eval_capacity_factor`` in evaluation too (DeepSpeed's
            behaviour); False routes every token in evaluation, so a sequence's output does not depend on the
            batch it is evaluated in. Generation routes every token either way (:func:`dropless_routing`).
        noisy_gate_policy: ``None``, ``"jitter"`` or ``"rsample"`` (see :class:`TopKRouter`).
        use_rts: Random Token Selection: random priority for capacity in training.
        use_residual: residual MoE: a dense FFN beside the experts, mixed by a learned coefficient.
        aux_loss_coef: weight of the load-balancing loss in ``aux_loss``.
        z_loss_coef: weight of the router z-loss in ``aux_loss``.
        normalize_weights: rescale the top-k weights to sum to 1 (default: when ``k > 1``).
        num_shared_experts: always-on experts (DeepSeek/Qwen-MoE style), one dense FFN of width
            ``num_shared_experts * ffn_hidden_size`` of the experts' kind whose output is added to the routed
            experts' output; split by tensor parallelism like a dense FFN.
        score_func: ``"softmax"`` or ``"sigmoid"`` router scores (see :class:`TopKRouter`).
        router_bias_update_rate: > 0 enables aux-loss-free balancing (DeepSeek-V3): a per-expert bias buffer
            steers the choice of experts and moves by ``rate * sign(mean_load - load)`` at each
            :meth:`update_router_bias` (called after every optimizer step with the loads of every
            data-parallel rank, see ``lightning_moe.parallel.update_router_biases``).
        drop_policy: ``"position"`` or ``"probs"`` (see :data:`DROP_POLICIES`); ``"probs"`` ignores ``use_rts``.
        aux_loss_scope: ``"local"`` or ``"global"`` (see :mod:`lightning_moe.moe.balance`): ``"global"``
            balance statistics are summed over the data-parallel group once the model is parallelised.
        fp32_gating: the gate's product in fp32 whatever the compute dtype (default), or in the compute dtype
            (bf16 under bf16 autocast: faster, routing from bf16-rounded logits); softmax, choice and losses
            are fp32 either way (see :class:`TopKRouter`).

    ``forward(x, padding_mask=None)``: ``x`` is ``[..., hidden_size]``; ``padding_mask`` has ``x``'s
    leading shape, True marks padding, which is not routed, takes no capacity and counts in no loss
    (its output row is zero, plus the residual FFN's or the shared experts' output when the layer has them).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        ffn_hidden_size: int,
        k: int = 1,
        expert: str | nn.Module = "ffn",
        activation: str | None = None,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        eval_drop_tokens: bool = True,
        noisy_gate_policy: str | None = None,
        use_rts: bool = True,
        use_residual: bool = False,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        normalize_weights: bool | None = None,
        num_shared_experts: int = 0,
        score_func: str = "softmax",
        router_bias_update_rate: float = 0.0,
        drop_policy: str = "position",
        aux_loss_scope: str = "local",
        fp32_gating: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_shared_experts, bool) or not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ValueError(f"num_shared_experts={num_shared_experts!r} must be an integer >= 0")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy={drop_policy!r} is not supported; use one of {list(DROP_POLICIES)}")
        if aux_loss_scope not in AUX_LOSS_SCOPES:
            raise ValueError(f"aux_loss_scope={aux_loss_scope!r} is not supported; use one of {list(AUX_LOSS_SCOPES)}")
        _validate_arguments(
            hidden_size,
            num_experts,
            ffn_hidden_size,
            k,
            activation,
            capacity_factor,
            eval_capacity_factor,
            min_capacity,
            aux_loss_coef,
            z_loss_coef,
        )
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.ffn_hidden_size = ffn_hidden_size
        self.k = k
        self.capacity_factor = float(capacity_factor)
        self.eval_capacity_factor = float(eval_capacity_factor)
        self.min_capacity = int(min_capacity)
        self.drop_tokens = bool(drop_tokens)
        self.eval_drop_tokens = bool(eval_drop_tokens)
        self.use_rts = bool(use_rts)
        self.use_residual = bool(use_residual)
        self.aux_loss_coef = float(aux_loss_coef)
        self.z_loss_coef = float(z_loss_coef)
        self.num_shared_experts = num_shared_experts
        self.drop_policy = drop_policy
        self.aux_loss_scope = aux_loss_scope
        self.gate = TopKRouter(
            hidden_size,
            num_experts,
            k,
            normalize_noisy_gate_policy(noisy_gate_policy),
            normalize_weights=normalize_weights,
            score_func=score_func,
            bias_update_rate=router_bias_update_rate,
            fp32_gating=fp32_gating,
        )
        self.experts = build_experts(expert, num_experts, hidden_size, ffn_hidden_size, activation)
        # Runs the experts on the sorted rows; lightning_moe.parallel swaps it for a distributed one.
        self.token_dispatcher: TokenDispatcher = TokenDispatcher()
        # Sums the balance statistics over ranks with aux_loss_scope="global" (swapped by lightning_moe.parallel).
        self.balance_statistics: BalanceStatistics = BalanceStatistics()
        if num_shared_experts > 0:
            kind = expert if isinstance(expert, str) else "ffn"
            shared_activation = activation or ("silu" if kind == "glu" else "gelu")
            self.shared_experts = _DenseFFN(hidden_size, num_shared_experts * ffn_hidden_size, shared_activation, kind)
        # Routed assignments per expert since the last router-bias update (aux-loss-free balancing only).
        self._pending_load: Tensor | None = None
        if self.use_residual:
            self.residual_mlp = _DenseFFN(hidden_size, ffn_hidden_size, activation or "gelu")
            self.residual_coef = nn.Linear(hidden_size, 2)
        self.last_stats: MoEStats | None = None

    def reset_parameters(self) -> None:
        """Re-initialise every parameter (e.g. after building on the meta device and ``to_empty``)."""
        self.gate.reset_parameters()
        reset = getattr(self.experts, "reset_parameters", None)
        if callable(reset):
            reset()
        else:  # user-module experts: re-initialise each stacked copy like its template would
            for p in self.experts.parameters():
                nn.init.normal_(p, std=0.02)
        if self.use_residual:
            self.residual_mlp.reset_parameters()
            self.residual_coef.reset_parameters()
        if self.num_shared_experts > 0:
            self.shared_experts.reset_parameters()
        self._pending_load = None

    @property
    def balances_without_loss(self) -> bool:
        """Whether the router has the aux-loss-free balancing bias (``router_bias_update_rate > 0``)."""
        return self.gate.expert_bias is not None

    def take_router_load(self) -> Tensor | None:
        """The ``[E]`` assignments routed to each expert by training forwards since the last call (and reset);
        None if there were none or the layer has no balancing bias. With activation checkpointing a
        recomputed forward counts twice, which scales every count alike (the update reads only signs)."""
        load, self._pending_load = self._pending_load, None
        return load

    def update_router_bias(self, load: Tensor) -> None:
        """Aux-loss-free balancing step with ``load [E]`` counted over every data-parallel rank."""
        self.gate.update_bias(load)

    def keep_gradient_memory(self, keep: bool) -> None:
        """Whether the CPU experts reuse one step's weight-gradient memory at the next
        (:mod:`lightning_moe.moe.kernels.gradient_memory`); ``False`` also frees what is kept. Sharded-gradient
        training turns it off: there the full-size gradients should exist only until they are reduced."""
        memory = gradient_memory_of(self.experts)
        if memory is None:
            return
        memory.enabled = keep
        if not keep:
            memory.release()

    def capacity(self, num_tokens: int | Tensor) -> int | Tensor | None:
        """Per-expert capacity for ``num_tokens`` real tokens in the current mode (None if dropless).

        A 0-dim tensor ``num_tokens`` gives a 0-dim tensor capacity (see :func:`compute_capacity`)."""
        if not self.drop_tokens or not (self.training or self.eval_drop_tokens):
            return None
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return compute_capacity(num_tokens, self.num_experts, self.k, factor, self.min_capacity)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> MoEOutput:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoE expects inputs [..., {self.hidden_size}], got {tuple(x.shape)}")
        leading_shape = x.shape[:-1]
        tokens = x.reshape(-1, self.hidden_size)  # [T, d]
        num_tokens = tokens.shape[0]
        valid = None
        if padding_mask is not None:
            if padding_mask.shape != leading_shape:
                raise ValueError(
                    f"padding_mask must have the input's leading shape {tuple(leading_shape)}, "
                    f"got {tuple(padding_mask.shape)}"
                )
            valid = ~padding_mask.reshape(-1).to(torch.bool)  # [T]

        routing = self.gate(tokens)
        num_real = num_tokens if valid is None else valid.sum()  # a tensor: no host read for the capacity
        capacity = self.capacity(num_real)
        by_probs = self.drop_policy == "probs" and capacity is not None
        plan = plan_dispatch(
            routing.expert_index,
            routing.expert_weight,
            self.num_experts,
            capacity,
            valid=valid,
            random_priority=self.use_rts and self.training and capacity is not None,
            priority_score=routing.probs.gather(-1, routing.expert_index) if by_probs else None,  # [T, k]
        )
        if self.training and self.gate.expert_bias is not None:
            load = plan.routed_per_expert.detach()
            self._pending_load = load if self._pending_load is None else self._pending_load + load
        expert_in = permute_tokens(tokens, plan)  # [M, d]
        expert_out = self.token_dispatcher(self.experts, expert_in, plan.tokens_per_expert)  # [M, d]
        output = unpermute_tokens(expert_out, plan, num_tokens)  # [T, d]

        if self.use_residual:
            coef = torch.softmax(self.residual_coef(tokens), dim=-1)  # [T, 2]
            output = output * coef[:, :1] + self.residual_mlp(tokens) * coef[:, 1:]
        if self.num_shared_experts > 0:
            output = output + self.shared_experts(tokens)

        statistics = self.balance_statistics if self.aux_loss_scope == "global" else None
        balance, z_loss, entropy = router_losses(routing, plan.routed_per_expert, valid, self.k, statistics)
        aux_loss = self.aux_loss_coef * balance + self.z_loss_coef * z_loss
        kept = plan.tokens_per_expert.sum()
        dropped = 1.0 - kept.float() / max(plan.num_assignments, 1)
        self.last_stats = MoEStats(
            tokens_per_expert=plan.tokens_per_expert.detach(),
            dropped_fraction=dropped.detach(),
            router_entropy=entropy,
            balance_loss=balance.detach(),
            z_loss=z_loss.detach(),
            routed_per_expert=plan.routed_per_expert.detach(),
            num_assignments=plan.num_assignments,
        )
        # Under autocast the experts may compute (and return) the autocast dtype: the layer keeps x's dtype.
        output = output.reshape(x.shape).to(x.dtype)
        return MoEOutput(output, aux_loss, plan.routed_per_expert.detach())

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.k}, capacity_factor={self.capacity_factor}, "
            f"eval_capacity_factor={self.eval_capacity_factor}, min_capacity={self.min_capacity}, "
            f"drop_tokens={self.drop_tokens}, eval_drop_tokens={self.eval_drop_tokens}, use_rts={self.use_rts}, "
            f"use_residual={self.use_residual}, "
            f"num_shared_experts={self.num_shared_experts}, drop_policy={self.drop_policy!r}, "
            f"aux_loss_scope={self.aux_loss_scope!r}"
        )


def _validate_arguments(
    hidden_size: int,
    num_experts: int,
    ffn_hidden_size: int,
    k: int,
    activation: str | None,
    capacity_factor: float,
    eval_capacity_factor: float,
    min_capacity: int,
    aux_loss_coef: float,
    z_loss_coef: float,
) -> None:
    def positive_int(name: str, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")

    positive_int("hidden_size", hidden_size)
    positive_int("num_experts", num_experts)
    positive_int("ffn_hidden_size", ffn_hidden_size)
    positive_int("k", k)
    if k > num_experts:
        raise ValueError(f"k={k} must be at most num_experts={num_experts}; use k in 1..{num_experts}")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
        if not value > 0:
            raise ValueError(f"{name}={value!r} must be > 0 (1.0 = each expert takes its even share k*T/E)")
    if not isinstance(min_capacity, int) or min_capacity < 0:
        raise ValueError(f"min_capacity={min_capacity!r} must be an integer >= 0")
    for name, value in (("aux_loss_coef", aux_loss_coef), ("z_loss_coef", z_loss_coef)):
        if not value >= 0:
            raise ValueError(f"{name}={value!r} must be >= 0 (0 disables that loss)")


def find_moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """``(qualified name, layer)`` of every :class:`MoE` layer in ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


@contextmanager
def dropless_routing(model: nn.Module) -> Iterator[None]:
    """Within the block every :class:`MoE` layer of ``model`` routes every token to its experts (no capacity);
    each layer gets its own ``drop_tokens`` back afterwards, also after an error.

    For generation: a capacity is shared by every token routed together, so with it a sentence's output
    depends on the sentences decoded beside it, and a decoding step's few tokens, all at one position,
    crowd the same experts."""
    layers = [layer for _, layer in find_moe_layers(model)]
    settings = [layer.drop_tokens for layer in layers]
    for layer in layers:
        layer.drop_tokens = False
    try:
        yield
    finally:
        for layer, setting in zip(layers, settings):
            layer.drop_tokens = setting
