"""The largest MoE transformer that trains on one device, ZeRO stage 0 against stage 3 with CPU offload.

The dense part stays fixed (preset + overrides); the number of experts per MoE layer doubles
(``--experts-start``, 2x, 4x, ...) until a configuration fails to train ``--steps`` steps (CUDA out of
memory, a host-memory guard, or the time budget), then one size halfway between the last success and
the failure is tried (``--no-refine`` skips it). Each attempt runs in a fresh worker process (a clean
allocator, a clean 1-rank process group; a host OOM kill takes only the worker), through the same
``lightning_moe.parallel`` calls as ``MoEZeroStrategy``: model built on the meta device,
``parallelize`` (ZeRO stage, offload, bf16 mixed precision), materialised on the GPU (or on the CPU
with ``offload=params``) with ``to_empty`` + the model's ``init_weights``, AdamW (``foreach``, as the
strategy prefers for DTensor parameters; ``offload=optimizer``: ``CPUOffloadAdamW``), bf16 autocast.

On one GPU ZeRO stage 3 shards nothing (world size 1): every byte it saves comes from the offload.
``offload=params`` keeps fp32 parameters, gradients and AdamW moments in host memory (16 bytes per
parameter there) and brings each block's bf16 parameters to the GPU only while it runs.

Reported per configuration and expert count: parameters, whether it trained, step time, peak GPU
memory (``torch.cuda.max_memory_allocated``: model state *and* activations), and the bytes of model
state (parameters, gradients, optimizer state incl. offload master copies) resident on the GPU and on
the CPU after the last optimizer step. The summary gives, per configuration, the largest model that
trained, its GPU-resident model-state bytes per parameter, and the ratio of the largest models
(goal: offload >= 8x the parameters of stage 0). When the host memory guard stops the offload run,
the summary says so: the offloaded model is then bounded by host RAM (16 B/param), not by the GPU.

Examples (from the repository root)::

    python benchmarks/model_scale.py --device cpu --preset tiny --experts-start 2 --max-experts 8   # CPU smoke
    python benchmarks/model_scale.py --device cuda --preset base --d-model 1024 --ffn 4096 --heads 16 \\
        --experts-start 8 --time-budget 180 --json scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for path in (str(REPO), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
from train_throughput import (  # noqa: E402
    GiB,
    add_model_arguments,
    build_config,
    environment,
    parameter_counts,
    resolve_device,
    synthetic_batches,
)

DEFAULT_CONFIGS = ("0:none", "3:params")
HOST_BYTES_PER_PARAM = {"none": 0, "optimizer": 12, "params": 16}
"""Host bytes of model state per parameter: optimizer offload = fp32 master + 2 moments; params offload =
fp32 parameter + gradient + 2 moments (what stays in host memory between steps)."""
DEVICE_BYTES_PER_PARAM = {"none": 16, "optimizer": 8, "params": 0}
"""Device bytes of model state per parameter at rest (fp32 parameter, gradient, 2 AdamW moments)."""


# ------------------------------------------------------------------------------------------ worker


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, int]]:
    """Bytes of parameters, gradients and optimizer state by kind and device type (local shards, each storage once)."""
    from lightning_moe.parallel.memory import optimizer_parameters

    seen: set[tuple[str, int]] = set()
    totals: dict[str, dict[str, int]] = {}

    def add(kind: str, t: torch.Tensor | None) -> None:
        if t is None:
            return
        local = t.to_local() if hasattr(t, "to_local") else t
        key = (local.device.type, local.untyped_storage().data_ptr())
        if key in seen or local.numel() == 0:
            return
        seen.add(key)
        nbytes = local.untyped_storage().nbytes()
        bucket = totals.setdefault(kind, {})
        bucket[local.device.type] = bucket.get(local.device.type, 0) + nbytes

    params = optimizer_parameters(optimizer)
    for p in params:
        add("params", p)
    for p in params:
        add("grads", p.grad)
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                add("optimizer", value)
    for master in getattr(optimizer, "_masters", {}).values():
        add("optimizer", master)
    return totals


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build, parallelize and train one configuration for ``args.steps`` steps; the result record."""
    import torch.distributed as dist

    from lightning_moe.models import MoETransformer, sequence_cross_entropy
    from lightning_moe.parallel import (
        ParallelDims,
        expert_counts,
        mixed_precision_policy,
        offload_optimizer,
        parallelize,
    )

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "gloo" if device.type == "cpu" else ("nccl" if args.offload == "none" else "cuda:nccl,cpu:gloo")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    record: dict[str, Any] = {
        "experts": args.experts,
        "zero_stage": args.zero_stage,
        "offload": args.offload,
        "environment": environment(device),
    }
    try:
        torch.manual_seed(0)
        config = build_config(args)
        with torch.device("meta"):
            model = MoETransformer(config)
        counts = parameter_counts(model)
        record.update(
            params=int(counts["total"]), params_experts=int(counts["experts"]), params_active=int(counts["active"])
        )
        if args.simulate_oom_above and args.experts > args.simulate_oom_above:
            raise torch.OutOfMemoryError(f"simulated: {args.experts} experts > --simulate-oom-above")
        dims = ParallelDims(
            world_size=1,
            expert_parallel_size=1,
            tensor_parallel_size=1,
            zero_stage=args.zero_stage,
            offload=args.offload,
        )
        dims = dims.resolve(expert_counts(model))
        mesh = dims.build_mesh(device.type)
        parallelize(model, mesh, dims, mp_policy=mixed_precision_policy("bf16-mixed"))
        start = time.perf_counter()
        init_device = torch.device("cpu") if args.offload == "params" else device
        model.to_empty(device=init_device)  # FSDP2 re-registers its (sharded) parameters there
        with torch.no_grad():
            model.init_weights()  # the model's own initialisation (DTensor-aware nn.init)
        record["init_s"] = time.perf_counter() - start

        def make_optimizer(fused: bool) -> torch.optim.Optimizer:
            # Fused AdamW: no full-size temporaries (foreach needs some) and, on CPU DTensor shards, much faster.
            adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if fused else {"foreach": True}))
            return offload_optimizer(adamw) if args.offload == "optimizer" else adamw

        optimizer = make_optimizer(fused=True)
        batches = synthetic_batches(2, args.batch_size, args.src_len, args.tgt_len, config.vocab_size, device)
        step_s = []
        for i in range(args.steps):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            batch = batches[i % len(batches)]
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(batch["src"], None, batch["tgt_in"], None)
                ce, _, _ = sequence_cross_entropy(out.logits, batch["tgt_out"])
                loss = ce + out.aux_loss
            loss.backward()
            try:
                optimizer.step()
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - a fused kernel this build lacks: fall back to foreach once
                if i > 0 or "fused_adamw_error" in record:
                    raise
                record["fused_adamw_error"] = str(err).splitlines()[0][:300]
                optimizer = make_optimizer(fused=False)
                optimizer.step()
            record["loss"] = float(loss)  # also synchronises
            step_s.append(time.perf_counter() - start)
        record["step_s"] = step_s
        state = _model_state_bytes(model, optimizer)
        record["state_bytes"] = state
        by_device: dict[str, int] = {}
        for bucket in state.values():
            for dev, nbytes in bucket.items():
                by_device[dev] = by_device.get(dev, 0) + nbytes
        record["state_bytes_by_device"] = by_device
        record["ok"] = True
    except torch.OutOfMemoryError as err:  # CUDA (or CPU allocator) out of memory: the measurement, not a bug
        record.update(ok=False, error="out of memory", message=str(err).splitlines()[0][:300])
    except Exception as err:  # noqa: BLE001 - reported to the parent, which stops this configuration
        record.update(
            ok=False, error=type(err).__name__, message=str(err)[:500], traceback=traceback.format_exc()[-3000:]
        )
    if device.type == "cuda":
        record["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
        record["gpu_total_bytes"] = torch.cuda.get_device_properties(device).total_memory
    dist.destroy_process_group()
    return record


# ------------------------------------------------------------------------------------------ parent


def _mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _count_params(args: argparse.Namespace, experts: int) -> int:
    from lightning_moe.models import MoETransformer

    probe = argparse.Namespace(**{**vars(args), "experts": experts})
    with torch.device("meta"):
        model = MoETransformer(build_config(probe))
    return int(sum(p.numel() for p in model.parameters()))


def _run_worker(args: argparse.Namespace, stage: int, offload: str, experts: int, timeout: float) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--zero-stage",
        str(stage),
        "--offload",
        offload,
    ]
    for key, value in vars(args).items():
        if (
            key
            in (
                "worker",
                "zero_stage",
                "offload",
                "json",
                "configs",
                "time_budget",
                "experts",
                "no_refine",
                "max_experts",
                "experts_start",
                "host_memory_fraction",
            )
            or value is None
            or value is False
        ):
            continue
        flag = "--" + key.replace("_", "-")
        command += [flag] if value is True else [flag, str(value)]
    command += ["--experts", str(experts)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=max(timeout, 1.0), env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {"experts": experts, "ok": False, "error": "timeout", "wall_s": time.perf_counter() - start}
    record: dict[str, Any] = {"experts": experts, "ok": False, "error": f"exit code {proc.returncode}"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            record = json.loads(line[len("RESULT ") :])
    if proc.returncode < 0:
        record.update(ok=False, error=f"killed by signal {-proc.returncode} (host memory?)")
    if not record.get("ok") and "message" not in record:
        record["stderr_tail"] = proc.stderr[-1500:]
    record["wall_s"] = time.perf_counter() - start
    return record


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def _describe(record: dict[str, Any]) -> str:
    gpu_state = record.get("state_bytes_by_device", {}).get("cuda")
    host_state = record.get("state_bytes_by_device", {}).get("cpu")
    status = "ok" if record.get("ok") else f"FAILED: {record.get('error')}"
    steps = record.get("step_s") or []
    return (
        f"  E={record['experts']:>5} params={record.get('params', 0) / 1e9:7.3f}B  {status:<28} "
        f"step={steps[-1] if steps else float('nan'):7.2f}s  peak_gpu={_gib(record.get('peak_gpu_bytes'))} GiB  "
        f"state gpu={_gib(gpu_state)} GiB cpu={_gib(host_state)} GiB  wall={record.get('wall_s', 0):.0f}s"
    )


def scale(args: argparse.Namespace) -> dict[str, Any]:
    """Grow the experts for each configuration within the time budget; the full record."""
    # The parent never touches CUDA (a context of its own would take GPU memory from the workers): the GPU's
    # size and the environment come from the first worker.
    device = torch.device(args.device)
    deadline = time.monotonic() + args.time_budget
    configs = [(int(c.split(":")[0]), c.split(":")[1]) for c in args.configs]
    gpu_total: int | None = None
    results: dict[str, Any] = {
        "benchmark": "model_scale",
        "environment": None,
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "worker")},
        "runs": {},
    }
    for index, (stage, offload) in enumerate(configs):
        name = f"stage{stage}-{offload}"
        share = (deadline - time.monotonic()) / (len(configs) - index)  # this configuration's part of what is left
        config_deadline = time.monotonic() + share
        attempts: list[dict[str, Any]] = []
        stop_reason = "max experts reached"
        print(f"# {name}: ZeRO stage {stage}, offload={offload}, {share:.0f} s", flush=True)
        experts, good, bad = args.experts_start, None, None
        refined = args.no_refine
        while True:
            if experts > args.max_experts:
                stop_reason = "max experts reached"
                break
            params = _count_params(args, experts)
            host_need = HOST_BYTES_PER_PARAM[offload] * params
            available = _mem_available_bytes()
            if device.type == "cuda" and available is not None and host_need > args.host_memory_fraction * available:
                stop_reason = (
                    f"host memory guard: E={experts} needs ~{host_need / GiB:.0f} GiB of host memory for "
                    f"{params / 1e9:.2f}B params, {available / GiB:.0f} GiB available"
                )
                attempts.append({"experts": experts, "params": params, "ok": False, "error": "skipped: host memory"})
                bad = experts
            elif gpu_total is not None and DEVICE_BYTES_PER_PARAM[offload] * params > gpu_total:
                stop_reason = (
                    f"E={experts}: model state alone ({DEVICE_BYTES_PER_PARAM[offload]} B/param) exceeds the GPU"
                )
                attempts.append({"experts": experts, "params": params, "ok": False, "error": "skipped: GPU memory"})
                bad = experts
            else:
                remaining = config_deadline - time.monotonic()
                timed = [a for a in attempts if a.get("wall_s")]
                # Predicted time: the last attempt's, scaled with the parameter count, plus a margin.
                predicted = 1.2 * timed[-1]["wall_s"] * max(1.0, params / timed[-1]["params"]) if timed else 0.0
                if remaining <= 5 or predicted > remaining:
                    stop_reason = f"time budget (E={experts} would need ~{predicted:.0f} s, {remaining:.0f} s left)"
                    break
                record = _run_worker(args, stage, offload, experts, remaining)
                record.setdefault("params", params)
                if results["environment"] is None and record.get("environment"):
                    results["environment"] = record["environment"]
                gpu_total = gpu_total or record.get("gpu_total_bytes")
                attempts.append(record)
                print(_describe(record), flush=True)
                results["runs"][name] = {"attempts": attempts, "summary": {"stop_reason": "running"}}
                _save(args, results)  # partial results survive an outer timeout
                if record.get("ok"):
                    good = experts
                else:
                    bad = experts
                    stop_reason = f"E={experts} failed: {record.get('error')}"
            if bad is None:
                experts *= 2
                continue
            # The first failure: try halfway between the last success and it, once.
            if refined or good is None or bad - good < 2:
                break
            refined = True
            experts = (good + bad) // 2
        trained = [a for a in attempts if a.get("ok")]
        best = max(trained, key=lambda a: a["params"]) if trained else None
        summary: dict[str, Any] = {"zero_stage": stage, "offload": offload, "stop_reason": stop_reason}
        if best is not None:
            gpu_state = best.get("state_bytes_by_device", {}).get(device.type if device.type == "cuda" else "cpu", 0)
            summary.update(
                largest_experts=best["experts"],
                largest_params=best["params"],
                gpu_state_bytes_per_param=(gpu_state / best["params"]) if device.type == "cuda" else None,
                peak_gpu_bytes_per_param=(best["peak_gpu_bytes"] / best["params"])
                if "peak_gpu_bytes" in best
                else None,
                step_s=best["step_s"][-1],
            )
        results["runs"][name] = {"attempts": attempts, "summary": summary}
        print(f"  -> {summary}", flush=True)
    results["summary"] = _compare(results["runs"])
    return results


def _save(args: argparse.Namespace, results: dict[str, Any]) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


def _compare(runs: dict[str, Any]) -> dict[str, Any]:
    """Offload against stage 0: ratio of the largest trained models and of GPU-resident state per parameter."""
    base = runs.get("stage0-none", {}).get("summary", {})
    out: dict[str, Any] = {}
    for name, run in runs.items():
        if name == "stage0-none":
            continue
        s = run["summary"]
        if base.get("largest_params") and s.get("largest_params"):
            out[f"{name}_params_ratio"] = s["largest_params"] / base["largest_params"]
            out[f"{name}_goal_8x_met"] = out[f"{name}_params_ratio"] >= 8
            for key in ("gpu_state_bytes_per_param", "peak_gpu_bytes_per_param"):
                b, o = base.get(key), s.get(key)
                if b is not None and o is not None:
                    out[f"stage0-none_{key}"] = b
                    out[f"{name}_{key}"] = o
                    if o > 0:
                        out[f"{name}_{key}_reduction"] = b / o
            out[f"{name}_limited_by"] = (
                "host memory" if "host memory" in s.get("stop_reason", "") else s.get("stop_reason")
            )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.set_defaults(preset="base", batch_size=8, src_len=128, tgt_len=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(DEFAULT_CONFIGS),
        help="ZERO_STAGE:OFFLOAD pairs, e.g. 0:none 3:params 3:optimizer",
    )
    parser.add_argument("--experts-start", type=int, default=8)
    parser.add_argument("--max-experts", type=int, default=4096)
    parser.add_argument("--no-refine", action="store_true", help="do not try the size halfway after the first failure")
    parser.add_argument("--steps", type=int, default=2, help="training steps per attempt")
    parser.add_argument("--time-budget", type=float, default=180.0, help="seconds for the whole run")
    parser.add_argument(
        "--host-memory-fraction",
        type=float,
        default=0.8,
        help="skip sizes whose host-side state exceeds this share of MemAvailable (CUDA runs)",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per worker (0: torch's default)")
    parser.add_argument("--json", type=Path, help="write the full record to this file")
    parser.add_argument(
        "--simulate-oom-above",
        type=int,
        default=0,
        help="testing only: workers with more experts than this report out of memory",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero-stage", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--offload", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return None
    results = scale(args)
    print("# summary:", json.dumps(results["summary"]), flush=True)
    _save(args, results)
    return results


if __name__ == "__main__":
    main()
