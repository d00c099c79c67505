"""Where a benchmark's step spends its time: a short ``torch.profiler`` window, printed as a table.

Used by ``train_throughput.py --profile N`` and ``moe_layer.py --profile``. Reports the top operators by
device time (self time, so nested operators are not counted twice) and, on CUDA, how busy the GPU was:
the sum of kernel times over the window's wall time. A busy fraction far below 1 means the step is bound
by the host (Python, dispatch, launches, synchronisations), not by the kernels.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def profile_steps(step: Callable[[], object], steps: int, device: torch.device, top: int = 15) -> dict[str, float]:
    """Run ``step`` ``steps`` times under the profiler; print the top operators; return the busy fraction."""
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    if on_cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if on_cuda:
            torch.cuda.synchronize(device)
        wall_s = time.perf_counter() - start
    sort_key = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_key, row_limit=top, max_name_column_width=60))
    result = {"profile_steps": steps, "profile_wall_ms_per_step": wall_s / steps * 1e3}
    if on_cuda:
        # Kernels only: an operator row repeats its kernels' time. The profiler's overhead inflates the wall time.
        kernel_us = sum(
            event.self_device_time_total for event in prof.key_averages() if event.device_type == DeviceType.CUDA
        )
        result["gpu_busy_fraction"] = kernel_us / 1e6 / wall_s
        result["kernel_ms_per_step"] = kernel_us / 1e3 / steps
        print(
            f"# profile: {steps} steps, {result['profile_wall_ms_per_step']:.1f} ms/step wall, "
            f"{result['kernel_ms_per_step']:.1f} ms/step in kernels, GPU busy {result['gpu_busy_fraction']:.0%}"
        )
    return result
