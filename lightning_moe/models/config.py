"""Configuration of the encoder-decoder MoE transformer: dataclasses, validation and named presets.

``TransformerConfig`` describes the architecture; its embedded ``MoEConfig`` holds the arguments of every
:class:`lightning_moe.moe.MoE` layer, one field per constructor argument. With ``moe.num_experts == 0``
the same config describes the *dense twin*: every FFN is dense, and the FFNs at the MoE positions are
``k`` times wider (plus one expert width with ``use_residual``), so that a token sees as many parameters
as it does in the MoE model.

The dataclasses work as Hydra/OmegaConf structured configs (no ``Literal`` or ``X | None`` annotations).
"""

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from lightning_moe.moe.balance import AUX_LOSS_SCOPES
from lightning_moe.moe.experts import ACTIVATIONS
from lightning_moe.moe.layer import DROP_POLICIES
from lightning_moe.moe.router import SCORE_FUNCS, normalize_noisy_gate_policy

__all__ = [
    "MoEConfig",
    "TransformerConfig",
    "PRESETS",
    "MOE_PRESETS",
    "DEFAULT_MOE_PRESET",
    "get_preset",
    "dense_twin",
    "EXPERT_TYPES",
    "POSITIONAL",
]

EXPERT_TYPES = ("ffn", "glu")
"""Expert (and dense FFN) kinds: ``ffn`` = ``fc2(act(fc1 x))`` with biases; ``glu`` = ``fc2(act(fc1 x) * fc3 x)``."""

POSITIONAL = ("sinusoidal", "learned")
"""Kinds of position encoding."""


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: use an integer >= {minimum}")


def _check_float(name: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = value > low if low_open else value >= low
        if high is not None:
            ok = ok and value < high
    if not ok:
        lo = f"> {low}" if low_open else f">= {low}"
        hi = "" if high is None else f" and < {high}"
        raise ValueError(f"{name}={value!r} is invalid: use a number {lo}{hi}")


@dataclass
class MoEConfig:
    """Arguments of every MoE layer of the model; the field names are those of ``MoE(...)``."""

    num_experts: Any = 0
    """Experts per MoE layer: one count for every layer, or a list with one count per MoE layer, encoder
    layers first, then decoder layers (PR-MoE pyramid: ``[4, 4, 8, 8]``). 0 = dense model (the dense twin
    of the same config with experts). Typed ``Any`` so the command line takes ``moe.num_experts=8`` and
    ``moe.num_experts=[4,4,8,8]``; checked in ``__post_init__``."""
    k: int = 1
    """Experts each token is routed to (top-k). Also sets the dense twin's FFN width at MoE positions."""
    expert: str = "ffn"
    """Expert kind, one of ``EXPERT_TYPES``; the dense FFNs of the model use the same kind."""
    activation: str | None = None
    """Activation of experts, residual FFN and dense FFNs: a key of ``lightning_moe.moe.experts.ACTIVATIONS``;
    None = ``"gelu"`` for ``ffn`` experts, ``"silu"`` for ``glu`` experts."""
    capacity_factor: float = 1.0
    """Training capacity per expert, as a multiple of the even share ``k * tokens / E``."""
    eval_capacity_factor: float = 1.0
    """Capacity factor in eval mode (validation) when ``eval_drop_tokens`` is true."""
    min_capacity: int = 4
    """Lower bound on the capacity of each expert, in tokens."""
    drop_tokens: bool = True
    """Drop tokens over capacity (True) or give every expert unlimited capacity (False)."""
    eval_drop_tokens: bool = False
    """Drop tokens over ``eval_capacity_factor`` in validation too (True, DeepSpeed's behaviour), or route every
    token there (False): a sentence's loss then does not depend on its batch, and with a capacity a batch of
    similar sentences crowds the same experts (README, "The MoE layer"). Generation never drops."""
    noisy_gate_policy: str | None = None
    """Router noise in training: None, ``"jitter"`` or ``"rsample"`` (DeepSpeed spellings accepted)."""
    use_rts: bool = True
    """Random token selection: which tokens over capacity are dropped is random, not positional."""
    use_residual: bool = False
    """Residual MoE (PR-MoE): a dense FFN beside the experts, mixed by a learned coefficient."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss in each layer's ``aux_loss``."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss in each layer's ``aux_loss``."""
    num_shared_experts: int = 0
    """Always-on shared experts per MoE layer (DeepSeek/Qwen-MoE style), added to the routed experts' output;
    counted as active parameters, split by tensor parallelism like a dense FFN. 0 = none."""
    score_func: str = "softmax"
    """Router scores: ``"softmax"`` over experts, or ``"sigmoid"`` per expert (DeepSeek-V3)."""
    router_bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): > 0 adds a per-expert bias to the scores for the choice of
    experts only, moved by ``rate * sign(mean_load - load)`` after each optimizer step with the loads of every
    data-parallel rank (try 1e-3 with ``aux_loss_coef=0``). 0 = off."""
    drop_policy: str = "position"
    """Which assignments an expert over capacity keeps: ``"position"`` (choice rank, then token order, random
    with ``use_rts``) or ``"probs"`` (the highest router probability)."""
    aux_loss_scope: str = "local"
    """Balance-loss statistics: ``"local"`` (this rank's tokens) or ``"global"`` (summed over the data-parallel
    group, so the loss equals the single-process value)."""
    fp32_gating: bool = True
    """The router's product ``x @ W^T`` in fp32 whatever the precision (DeepSpeed's behaviour), or with False in
    the compute dtype (bf16 under ``bf16-mixed``: cheaper, routing from bf16-rounded logits). Softmax, top-k
    and the aux losses are fp32 either way."""
    upcycle: bool = False
    """With ``init_from=DENSE.ckpt``: build the MoE layers from the dense checkpoint's FFNs (each expert a
    copy of the dense FFN at the same position, a zero router), see ``lightning_moe.models.upcycle``."""

    def __post_init__(self) -> None:
        counts = self.num_experts
        if isinstance(counts, (list, tuple)) or type(counts).__name__ == "ListConfig":
            counts = list(counts)
            if not counts:
                raise ValueError("moe.num_experts=[] is invalid: use an integer >= 0 or a list of integers >= 1")
            for i, count in enumerate(counts):
                _check_int(f"moe.num_experts[{i}]", count, 1)
            self.num_experts = counts
        else:
            _check_int("moe.num_experts", counts, 0)
        _check_int("moe.k", self.k, 1)
        if self.enabled and self.k > min(self.expert_counts):
            raise ValueError(f"moe.k={self.k} is larger than moe.num_experts={self.num_experts}: use k <= num_experts")
        if self.expert not in EXPERT_TYPES:
            raise ValueError(f"moe.expert={self.expert!r} is not supported: use one of {list(EXPERT_TYPES)}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"moe.activation={self.activation!r} is not supported: use one of {sorted(ACTIVATIONS)}")
        _check_float("moe.capacity_factor", self.capacity_factor, 0.0, low_open=True)
        _check_float("moe.eval_capacity_factor", self.eval_capacity_factor, 0.0, low_open=True)
        _check_int("moe.min_capacity", self.min_capacity, 0)
        try:
            normalize_noisy_gate_policy(self.noisy_gate_policy)
        except ValueError as err:
            raise ValueError(f"moe.{err}") from None
        _check_float("moe.aux_loss_coef", self.aux_loss_coef, 0.0)
        _check_float("moe.z_loss_coef", self.z_loss_coef, 0.0)
        _check_int("moe.num_shared_experts", self.num_shared_experts, 0)
        _check_float("moe.router_bias_update_rate", self.router_bias_update_rate, 0.0)
        for name, value, choices in (
            ("score_func", self.score_func, SCORE_FUNCS),
            ("drop_policy", self.drop_policy, DROP_POLICIES),
            ("aux_loss_scope", self.aux_loss_scope, AUX_LOSS_SCOPES),
        ):
            if value not in choices:
                raise ValueError(f"moe.{name}={value!r} is not supported: use one of {list(choices)}")
        for name in ("drop_tokens", "eval_drop_tokens", "use_rts", "use_residual", "fp32_gating", "upcycle"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"moe.{name}={getattr(self, name)!r} is invalid: use true or false")

    @property
    def enabled(self) -> bool:
        """Whether the model has MoE layers (``num_experts`` a list, or > 0)."""
        return isinstance(self.num_experts, list) or self.num_experts > 0

    @property
    def expert_counts(self) -> list[int]:
        """The counts given: one per MoE layer for a list, ``[num_experts]`` for one count (``[]`` when dense)."""
        if isinstance(self.num_experts, list):
            return list(self.num_experts)
        return [self.num_experts] if self.num_experts > 0 else []

    @property
    def resolved_activation(self) -> str:
        """``activation``, or the expert kind's default when it is None."""
        if self.activation is not None:
            return self.activation
        return "silu" if self.expert == "glu" else "gelu"

    def layer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``MoE(hidden_size, num_experts, ffn_hidden_size, **kwargs)`` (all but the first three).

        ``activation`` is resolved, so the experts, the residual FFN and the dense FFNs agree.
        """
        kwargs = asdict(self)
        del kwargs["num_experts"], kwargs["upcycle"]
        kwargs["activation"] = self.resolved_activation
        return kwargs


@dataclass
class TransformerConfig:
    """Architecture of :class:`lightning_moe.models.MoETransformer` (pre-LayerNorm encoder-decoder)."""

    vocab_size: int = 8000
    """Size of the shared source/target vocabulary (set it from the tokenizer)."""
    d_model: int = 512
    """Model width."""
    num_heads: int = 8
    """Attention heads; must divide ``d_model``."""
    ffn_hidden_size: int = 2048
    """Inner width of a dense FFN, and of each expert."""
    encoder_layers: int = 6
    """Encoder blocks."""
    decoder_layers: int = 6
    """Decoder blocks."""
    dropout: float = 0.1
    """Dropout on embeddings and on every residual branch."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    activation_dropout: float = 0.0
    """Dropout after the activation of dense FFNs (experts have none)."""
    max_positions: int = 256
    """Longest source or target sequence (positions), including the BOS/EOS/tag tokens."""
    positional: str = "sinusoidal"
    """Position encoding: ``"sinusoidal"`` (fixed, computed on the fly) or ``"learned"``."""
    scale_embeddings: bool = True
    """Multiply token embeddings by ``sqrt(d_model)`` before adding positions."""
    tie_embeddings: bool = True
    """One embedding matrix for source tokens, target tokens and the output projection."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""
    residual_in_compute_dtype: bool = True
    """Under autocast (``bf16-mixed``), carry the residual stream (embeddings, block outputs, encoder output) in the
    autocast dtype, as FSDP's and DeepSpeed's bf16 training do; parameters and optimizer state stay fp32. False keeps
    it in fp32, autocast's default: every block's branch is cast up and added to an fp32 stream (3-9% slower
    bf16 steps on CPU, README issue 15; the same validation NLL either way). No effect without autocast."""
    moe_every: int = 2
    """Every ``moe_every``-th block of encoder and decoder is an MoE block (1 = all, 2 = every other)."""
    moe_offset: int | None = None
    """Block ``i`` is MoE when ``i % moe_every == moe_offset``; None = ``moe_every - 1`` (the 2nd, 4th, ...)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """The MoE layers' arguments; ``moe.num_experts = 0`` gives the dense twin."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # e.g. TransformerConfig(**yaml_dict)
            self.moe = MoEConfig(**self.moe)
        if not isinstance(self.moe, MoEConfig):
            raise ValueError(f"moe={self.moe!r} is invalid: use a MoEConfig or a dict of its fields")
        _check_int("vocab_size", self.vocab_size, 2)
        _check_int("d_model", self.d_model, 1)
        _check_int("num_heads", self.num_heads, 1)
        if self.d_model % self.num_heads != 0:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide d_model={self.d_model}: choose a divisor of d_model"
            )
        _check_int("ffn_hidden_size", self.ffn_hidden_size, 1)
        _check_int("encoder_layers", self.encoder_layers, 1)
        _check_int("decoder_layers", self.decoder_layers, 1)
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            _check_float(name, getattr(self, name), 0.0, 1.0)
        _check_int("max_positions", self.max_positions, 2)
        if self.positional not in POSITIONAL:
            raise ValueError(f"positional={self.positional!r} is not supported: use one of {list(POSITIONAL)}")
        for name in ("scale_embeddings", "tie_embeddings", "residual_in_compute_dtype"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: use true or false")
        _check_float("norm_eps", self.norm_eps, 0.0, low_open=True)
        _check_int("moe_every", self.moe_every, 1)
        if self.moe_offset is not None:
            if (
                isinstance(self.moe_offset, bool)
                or not isinstance(self.moe_offset, int)
                or not (0 <= self.moe_offset < self.moe_every)
            ):
                raise ValueError(
                    f"moe_offset={self.moe_offset!r} is invalid: "
                    f"use null or an integer in [0, moe_every={self.moe_every})"
                )
        if isinstance(self.moe.num_experts, list) and len(self.moe.num_experts) != self.num_moe_layers:
            raise ValueError(
                f"moe.num_experts={self.moe.num_experts} has {len(self.moe.num_experts)} counts but the model has "
                f"{self.num_moe_layers} MoE layers (encoder first, then decoder): give one count per MoE layer"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.num_heads

    def is_moe_position(self, index: int) -> bool:
        """Whether block ``index`` (of the encoder or the decoder) is at an MoE position.

        True for the dense twin as well: there the block has the wider dense FFN.
        """
        offset = self.moe_every - 1 if self.moe_offset is None else self.moe_offset
        return index % self.moe_every == offset

    @property
    def num_moe_layers(self) -> int:
        """MoE positions of the encoder plus those of the decoder."""
        encoder = sum(self.is_moe_position(i) for i in range(self.encoder_layers))
        return encoder + sum(self.is_moe_position(i) for i in range(self.decoder_layers))

    def experts_per_moe_layer(self) -> list[int]:
        """The expert count of every MoE layer, encoder layers first (``[]`` for the dense twin)."""
        counts = self.moe.expert_counts
        if len(counts) == 1 and not isinstance(self.moe.num_experts, list):
            counts = counts * self.num_moe_layers
        return counts

    def num_experts_at(self, index: int, decoder: bool) -> int:
        """The expert count of the MoE layer in block ``index`` of the encoder (or the decoder)."""
        ordinal = sum(self.is_moe_position(i) for i in range(index))
        if decoder:
            ordinal += sum(self.is_moe_position(i) for i in range(self.encoder_layers))
        return self.experts_per_moe_layer()[ordinal]

    def dense_ffn_hidden_size(self, index: int) -> int:
        """Hidden width of the dense FFN of block ``index`` when the model is dense (``num_experts == 0``)."""
        h = self.ffn_hidden_size
        if not self.is_moe_position(index):
            return h
        width = self.moe.k * h
        if self.moe.use_residual:
            # The residual branch is a plain two-matrix FFN of width h; a GLU FFN has three matrices,
            # so the same parameters buy it 2/3 of the width.
            width += h if self.moe.expert == "ffn" else (2 * h) // 3
        return width + self.moe.num_shared_experts * h


def dense_twin(config: TransformerConfig) -> TransformerConfig:
    """The dense model with the same active parameters per token as ``config`` (``moe.num_experts = 0``)."""
    return replace(config, moe=replace(config.moe, num_experts=0))


MOE_PRESETS: dict[str, MoEConfig] = {
    # The dense twin: no experts; the FFNs at MoE positions are k times wider (same active parameters).
    "dense": MoEConfig(num_experts=0, k=2),
    # Switch-style: one expert per token.
    "top1": MoEConfig(num_experts=8, k=1, capacity_factor=1.25, eval_capacity_factor=2.0),
    # GShard-style: two experts per token, weights renormalised over the two.
    "top2": MoEConfig(num_experts=8, k=2, capacity_factor=1.25, eval_capacity_factor=2.0),
    # Every token reaches its experts (no capacity), top-2.
    "dropless": MoEConfig(num_experts=8, k=2, drop_tokens=False),
    # Residual MoE (DeepSpeed-MoE's PR-MoE building block): a dense FFN beside top-1 experts.
    "residual": MoEConfig(num_experts=8, k=1, use_residual=True, capacity_factor=1.25, eval_capacity_factor=2.0),
}
"""Named MoE layer settings (the ``moe`` group of the command line). Do not mutate these."""

DEFAULT_MOE_PRESET = "top2"
"""The MoE settings of every model preset, and the command line's default ``moe`` option."""

PRESETS: dict[str, TransformerConfig] = {
    # Trains on two CPU cores in minutes.
    "tiny": TransformerConfig(
        d_model=128,
        num_heads=4,
        ffn_hidden_size=256,
        encoder_layers=2,
        decoder_layers=2,
        dropout=0.1,
        moe=MOE_PRESETS[DEFAULT_MOE_PRESET],
    ),
    "small": TransformerConfig(
        d_model=256,
        num_heads=4,
        ffn_hidden_size=1024,
        encoder_layers=3,
        decoder_layers=3,
        dropout=0.1,
        moe=MOE_PRESETS[DEFAULT_MOE_PRESET],
    ),
    # Transformer-base widths (Vaswani et al.); every other FFN is an MoE layer (Z-code style).
    "base": TransformerConfig(
        d_model=512,
        num_heads=8,
        ffn_hidden_size=2048,
        encoder_layers=6,
        decoder_layers=6,
        dropout=0.1,
        moe=MOE_PRESETS[DEFAULT_MOE_PRESET],
    ),
}
"""Named architectures (the ``model`` group of the command line, whose MoE part is the ``moe`` group).
``get_preset`` returns copies; do not mutate these."""

_MOE_FIELDS = {f.name for f in fields(MoEConfig)}
_TOP_FIELDS = {f.name for f in fields(TransformerConfig)}


def get_preset(name: str, **overrides: Any) -> TransformerConfig:
    """A copy of preset ``name`` with ``overrides`` applied (and validated).

    Overrides name fields of :class:`TransformerConfig`, or fields of :class:`MoEConfig` directly
    (``get_preset("tiny", num_experts=0, vocab_size=1000)``), or ``moe=`` a MoEConfig / dict.
    """
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} does not exist: use one of {sorted(PRESETS)}")
    unknown = set(overrides) - _MOE_FIELDS - _TOP_FIELDS
    if unknown:
        raise ValueError(
            f"unknown config keys {sorted(unknown)}: use fields of TransformerConfig {sorted(_TOP_FIELDS)} "
            f"or of MoEConfig {sorted(_MOE_FIELDS)}"
        )
    base = PRESETS[name]
    moe = overrides.pop("moe", base.moe)
    if isinstance(moe, dict):
        moe = replace(base.moe, **moe)
    moe_overrides = {key: overrides.pop(key) for key in list(overrides) if key in _MOE_FIELDS}
    if moe_overrides:
        moe = replace(moe, **moe_overrides)
    return replace(base, moe=moe, **overrides)
