"""Dense -> MoE upcycling (Komatsuzaki et al., "Sparse Upcycling"): start an MoE model from a trained dense one.

Every MoE layer takes the dense FFN at the same qualified name: each expert becomes a copy of it, the router
starts at zero (every expert equally likely), the aux-loss-free bias at zero, a residual branch (PR-MoE)
becomes another copy mixed half and half, and shared experts start with a zero output projection. Every
other weight (attention, norms, embeddings, dense FFNs elsewhere) is copied as it is. So, in evaluation with
``drop_tokens=False``, the upcycled model computes the dense model's function at step 0: with a zero router
the top-k weights of a token sum to ``k/E`` (softmax) or ``k/2`` (sigmoid) unless they are normalised to 1, and
the experts' output projection is scaled by the inverse of that sum. When that sum is a power of two (e.g.
``k=2`` with normalised weights, or ``k=1`` with a power-of-two ``E``), every step of the computation is exact
in floating point and the outputs equal the dense model's up to the summation order of the matrix products.

The dense FFN at an MoE position must have the experts' width (``model.ffn_hidden_size``): train the dense model
with ``moe.num_experts=0 moe.k=1`` (its FFNs are then ``ffn_hidden_size`` wide everywhere) and the same
expert kind (``moe.expert``). Plain tensor code: no torch.distributed, no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_moe.moe import MoE, find_moe_layers

__all__ = ["upcycle_", "upcycled_state_dict"]


def _initial_weight_sum(layer: MoE) -> float:
    """The sum of a token's top-k combine weights when the router is zero."""
    gate = layer.gate
    if gate.normalize_weights:
        return 1.0
    score = 0.5 if gate.score_func == "sigmoid" else 1.0 / layer.num_experts
    return layer.k * score


def upcycled_state_dict(
    model: nn.Module, dense_state: Mapping[str, Tensor], source: str = "the dense checkpoint"
) -> dict[str, Tensor]:
    """The state dict of MoE ``model`` upcycled from ``dense_state``, the (unsharded) state dict of its dense
    version: the same qualified names, with a dense FFN (``fc1``, ``fc2``, ``fc3`` for GLU, as
    :class:`lightning_moe.models.transformer.FeedForward`) where ``model`` has an MoE layer.

    Raises:
        ValueError: one line naming the key that is missing or has the wrong shape, and what to do.
    """
    own = model.state_dict()
    state: dict[str, Tensor] = {}
    moe_prefixes = []
    for name, layer in find_moe_layers(model):
        prefix = f"{name}." if name else ""
        moe_prefixes.append(prefix)
        state.update(_upcycle_layer(layer, prefix, dense_state, own, source))
    for key, value in own.items():
        if any(key.startswith(p) for p in moe_prefixes):
            continue
        if key not in dense_state:
            raise ValueError(f"{source} has no {key!r}: upcycle from the dense version of the same architecture")
        if dense_state[key].shape != value.shape:
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(dense_state[key].shape)}, the MoE model {tuple(value.shape)}: "
                "upcycle from the dense version of the same architecture"
            )
        state[key] = dense_state[key]
    return state


def _upcycle_layer(
    layer: MoE, prefix: str, dense: Mapping[str, Tensor], own: Mapping[str, Tensor], source: str
) -> dict[str, Tensor]:
    experts = layer.experts
    glu = hasattr(experts, "w3")
    if not hasattr(experts, "w1") or not hasattr(experts, "w2"):
        raise ValueError(
            f"MoE layer {prefix[:-1]!r} has {type(experts).__name__} experts: upcycling needs 'ffn' or 'glu' experts"
        )

    def dense_weight(name: str, shape: tuple[int, ...]) -> Tensor:
        key = f"{prefix}{name}"
        if key not in dense:
            raise ValueError(
                f"{source} has no {key!r}: the dense model needs an FFN ({'fc1, fc2, fc3' if glu else 'fc1, fc2'}) "
                f"where the MoE model has the MoE layer {prefix[:-1]!r} (same moe.expert kind)"
            )
        value = dense[key]
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(value.shape)}, the experts need {shape}: train the dense model "
                "with moe.num_experts=0 moe.k=1 so its FFNs have the experts' width (model.ffn_hidden_size)"
            )
        return value

    d, h, e = layer.hidden_size, layer.ffn_hidden_size, layer.num_experts
    scale = 1.0 / _initial_weight_sum(layer)
    fc1 = dense_weight("fc1.weight", (h, d)).t()  # [d, h]
    fc2 = dense_weight("fc2.weight", (d, h)).t()  # [h, d]
    out = {
        f"{prefix}experts.w1": fc1.expand(e, d, h).clone(),
        f"{prefix}experts.w2": (fc2 * scale).expand(e, h, d).clone(),
    }
    if glu:
        out[f"{prefix}experts.w3"] = dense_weight("fc3.weight", (h, d)).t().expand(e, d, h).clone()
    elif getattr(experts, "b1", None) is not None:
        out[f"{prefix}experts.b1"] = dense_weight("fc1.bias", (h,)).expand(e, h).clone()
        out[f"{prefix}experts.b2"] = (dense_weight("fc2.bias", (d,)) * scale).expand(e, d).clone()
    out[f"{prefix}gate.weight"] = torch.zeros_like(own[f"{prefix}gate.weight"])
    if layer.gate.expert_bias is not None:
        out[f"{prefix}gate.expert_bias"] = torch.zeros_like(own[f"{prefix}gate.expert_bias"])
    if layer.use_residual:
        # Residual MoE: output = experts * c0 + residual * c1 with c = softmax(0) = (1/2, 1/2): both copies.
        for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            key = f"{prefix}residual_mlp.{name}"
            if key in own:
                out[key] = dense_weight(name, tuple(own[key].shape)).clone()
        out[f"{prefix}residual_coef.weight"] = torch.zeros_like(own[f"{prefix}residual_coef.weight"])
        out[f"{prefix}residual_coef.bias"] = torch.zeros_like(own[f"{prefix}residual_coef.bias"])
    # Shared experts keep their initialisation but start silent: a zero output projection.
    for key, value in own.items():
        if key.startswith(f"{prefix}shared_experts."):
            out[key] = torch.zeros_like(value) if key.startswith(f"{prefix}shared_experts.fc2.") else value.clone()
    missing = [k for k in own if k.startswith(prefix) and k not in out]
    if missing:
        raise ValueError(f"upcycling does not know how to fill {missing}; open an issue with the layer's options")
    if not math.isfinite(scale):
        raise ValueError(f"MoE layer {prefix[:-1]!r}: the initial combine weights sum to 0")
    return out


@torch.no_grad()
def upcycle_(model: nn.Module, dense: nn.Module | Mapping[str, Tensor], source: str = "the dense model") -> nn.Module:
    """Initialise MoE ``model`` (unsharded, in place) from ``dense``: a dense model of the same architecture,
    or its state dict (e.g. ``read_checkpoint(path)["state_dict"]`` with a LightningModule ``model``).
    Returns ``model``. See the module docstring for what each part becomes."""
    dense_state = dense.state_dict() if isinstance(dense, nn.Module) else dense
    model.load_state_dict(upcycled_state_dict(model, dense_state, source))
    return model
