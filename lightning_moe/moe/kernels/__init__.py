"""CPU runtime machinery behind the grouped experts: the per-expert loop with its hand-written backward,
expert threads and kept gradient memory. The MoE maths (routing, dispatch, the experts' contract) lives
one level up; nothing here changes a result, only how fast the CPU computes it."""

from lightning_moe.moe.kernels.gradient_memory import GradientMemory
from lightning_moe.moe.kernels.loop_experts import loop_expert_ffn, loop_expert_glu, loop_grouped_mm

__all__ = ["GradientMemory", "loop_expert_ffn", "loop_expert_glu", "loop_grouped_mm"]
