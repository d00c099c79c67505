#!/usr/bin/env bash
# One-call GPU check of lightning_moe (see /work/shared/GPU.md): environment, the `gpu` test subset, the MoE
# layer benchmark, a training-throughput benchmark and the model-scale benchmark, merged into one JSON.
#
# Usage (repository root or anywhere):   bash benchmarks/gpu_check.sh
#   Results: $OUT/gpu_results.json and $OUT/gpu_check.log when OUT is set, else benchmarks/results/gpu/.
#   Every step runs under `timeout`, failures are recorded and the next step still runs; the whole check
#   stays within GPU_CHECK_BUDGET seconds (default 540) so that a 600 s call returns with the results.
#   Exit code: 0 when every step passed, 1 otherwise (the JSON says which).
#   GPU_CHECK_NO_INSTALL=1 skips the editable install (a machine whose environment must not change).
#
# The GPU machines have torch, lightning, pytest, ... but not hydra-core / omegaconf / antlr4 (needed by
# lightning_moe.config, the CLIs and the rest of the test suite, not by this check). They travel as wheels
# in .whl/ (git-ignored; `carry: [".whl"]` in the device `run` call); made here, on a machine with pip and
# network access, from the repository root:
#
#   mkdir -p .whl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl hydra-core==1.3.2 omegaconf==2.3.0
#   # antlr4-python3-runtime 4.9.3 (omegaconf 2.3 pins 4.9.*) exists only as a source archive on PyPI: build
#   # its pure-Python wheel (antlr4_python3_runtime-4.9.3-py3-none-any.whl) locally instead.
#   python3 -m pip wheel --no-deps --no-cache-dir -w .whl antlr4-python3-runtime==4.9.3
#
# All three are py3-none-any wheels (the --platform flags only let pip accept them for another Python);
# their other requirements (PyYAML, packaging) are already on the GPU machines. Checked on 2026-11-27:
# the three files (~380 KB) download/build and import from a `pip install --target` directory.
#
# The device call (from the session that holds the GPU):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)

set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [ -n "${OUT:-}" ]; then RESULTS="$OUT"; else RESULTS="$REPO/benchmarks/results/gpu"; fi
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"   # intermediate files: only the merged JSON and the log go to $OUT
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-540}"
START=$(date +%s)
export PYTHONUNBUFFERED=1

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run_step NAME LIMIT_S COMMAND...: run under timeout (capped by what is left of the budget), record rc and time.
run_step() {
    local name="$1" limit="$2"; shift 2
    local left; left=$(( $(remaining) - 20 ))   # keep 20 s for the merge
    if [ "$left" -lt 10 ]; then
        echo "### $name: skipped, the check's time budget is spent"
        printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "$limit" >> "$WORK/steps.tsv"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo; echo "### $name (limit ${limit}s): $*"
    local t0 rc; t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@"
    rc=$?
    local took=$(( $(date +%s) - t0 ))
    [ $rc -eq 124 ] && echo "### $name: TIMED OUT after ${limit}s"
    echo "### $name: exit code $rc after ${took}s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$limit" >> "$WORK/steps.tsv"
    return 0
}

main() {
    echo "### lightning_moe GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s, results in $RESULTS"
    : > "$WORK/steps.tsv"

    # 1. environment
    nvidia-smi -L || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| available', torch.cuda.is_available(), '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"
    if compgen -G ".whl/*.whl" > /dev/null; then
        echo "### installing carried wheels: $(ls .whl)"
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
            export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
        else
            echo "### wheel install failed (the GPU tests and benchmarks do not need them)"
        fi
    else
        echo "### no .whl/ folder: hydra-core/omegaconf not installed (not needed by this check)"
    fi
    # lightning_moe importable: an offline editable install (maps tasks/ and conf/ into the package), and the
    # repository on PYTHONPATH in any case.
    if [ -z "${GPU_CHECK_NO_INSTALL:-}" ]; then
        timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . > "$WORK/pip_editable.txt" 2>&1 \
            || echo "### editable install failed (using PYTHONPATH): $(tail -n 2 "$WORK/pip_editable.txt")"
    fi
    export PYTHONPATH="$REPO:${PYTHONPATH:-}"
    "$PY" -c "import lightning_moe, lightning; print('lightning_moe', lightning_moe.__version__, 'from', lightning_moe.__file__, '| lightning', lightning.__version__)"
    "$PY" -c "import hydra, omegaconf; print('hydra', hydra.__version__, '| omegaconf', omegaconf.__version__)" 2>/dev/null || true

    # 2. the CUDA test subset
    run_step pytest_gpu "${GPU_CHECK_PYTEST_S:-200}" "$PY" -m pytest -m gpu tests/gpu -q -rA -p no:cacheprovider \
        --junitxml="$WORK/pytest_gpu.xml"

    # 3. the MoE layer against an equal-FLOP dense FFN (CPU shapes + T=16384, d=2048, h=8192, E=8/64, k=1/2)
    run_step moe_layer "${GPU_CHECK_LAYER_S:-150}" "$PY" benchmarks/moe_layer.py --device cuda --dtype bf16 --large \
        --threads "$(nproc)" --json "$WORK/moe_layer.json"

    # 4. training throughput of the MoE transformer, bf16-mixed, 30 timed steps after 5 warm-up steps
    run_step train_throughput_base "${GPU_CHECK_TRAIN_S:-90}" "$PY" benchmarks/train_throughput.py --device cuda \
        --precision bf16-mixed --preset base --experts 8 --k 2 --batch-size 64 --src-len 128 --tgt-len 128 \
        --steps 30 --warmup 5 --label base-E8-k2 --json "$WORK/train_throughput_base.json"
    run_step train_throughput_wide "${GPU_CHECK_TRAIN_S:-90}" "$PY" benchmarks/train_throughput.py --device cuda \
        --precision bf16-mixed --preset base --d-model 1024 --ffn 4096 --heads 16 --experts 16 --k 2 --vocab 32000 \
        --batch-size 32 --src-len 256 --tgt-len 256 --steps 30 --warmup 5 --label wide-E16-k2 \
        --json "$WORK/train_throughput_wide.json"

    # 5. the largest model that trains: ZeRO stage 0 vs stage 3 + parameter offload (own time budget)
    local scale_budget=$(( $(remaining) - 60 ))
    [ "$scale_budget" -gt "${GPU_CHECK_SCALE_S:-150}" ] && scale_budget=${GPU_CHECK_SCALE_S:-150}
    if [ "$scale_budget" -ge 30 ]; then
        run_step model_scale $(( scale_budget + 30 )) "$PY" benchmarks/model_scale.py --device cuda --preset base \
            --d-model 1024 --ffn 4096 --heads 16 --experts-start 16 --batch-size 8 --src-len 128 --tgt-len 128 \
            --time-budget "$scale_budget" --json "$WORK/model_scale.json"
    else
        echo "### model_scale: skipped, ${scale_budget}s left"
        printf '%s\t%s\t%s\t%s\n' model_scale skipped 0 0 >> "$WORK/steps.tsv"
    fi

    # 6. merge
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$WORK/nvidia_smi.txt" 2>/dev/null || true
    "$PY" - "$WORK" "$RESULTS/gpu_results.json" "$START" <<'PYEOF'
import json, os, platform, socket, sys, time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

work, target, start = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])

def load(name):
    path = work / name
    try:
        return json.loads(path.read_text())
    except Exception as err:  # missing (step failed or timed out) or unreadable
        return {"missing": f"{name}: {type(err).__name__}: {err}"[:300]}

steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, took, limit = line.split("\t")
    status = "passed" if rc == "0" else ("timed out" if rc in ("124", "137") else ("skipped" if rc == "skipped" else "failed"))
    steps.append({"step": name, "status": status, "exit_code": rc, "seconds": int(took), "limit_s": int(limit)})

tests = {"missing": "no junit file"}
try:
    root = ET.parse(work / "pytest_gpu.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = tag
                message = (node.get("message") or "")[:300]
                break
        entry = {"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "seconds": float(case.get("time") or 0)}
        if outcome != "passed":
            entry["message"] = message
        cases.append(entry)
    tests = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    tests["cases"] = cases
except Exception as err:
    tests = {"missing": f"pytest_gpu.xml: {type(err).__name__}: {err}"[:300]}

try:
    import torch
    torch_info = {"torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
except Exception as err:
    torch_info = {"error": str(err)}
smi = (work / "nvidia_smi.txt").read_text().strip() if (work / "nvidia_smi.txt").exists() else ""
result = {
    "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "card": torch_info.get("gpu"),
    "nvidia_smi": smi,
    "host": socket.gethostname(),
    "python": platform.python_version(),
    **torch_info,
    "total_seconds": int(time.time()) - start,
    "steps": steps,
    "all_passed": all(s["status"] == "passed" for s in steps),
    "pytest_gpu": tests,
    "moe_layer": load("moe_layer.json"),
    "train_throughput": [load("train_throughput_base.json"), load("train_throughput_wide.json")],
    "model_scale": load("model_scale.json"),
}
target.write_text(json.dumps(result, indent=2))

# The short table last: the device call returns the end of the output.
print(f"\n### summary ({result['card']}, torch {result.get('torch')}, {result['date_utc']}, {result['total_seconds']} s)")
for s in steps:
    print(f"  {s['step']:<24} {s['status']:<10} {s['seconds']:>4} s")
if "cases" in tests:
    print(f"  tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, {tests['skipped']} skipped")
    for case in tests["cases"]:
        if case["outcome"] in ("failure", "error"):
            print(f"    {case['outcome'].upper()}: {case['test']}: {case.get('message', '')[:160]}")
rows = result["moe_layer"] if isinstance(result["moe_layer"], list) else []
for row in rows:
    if row.get("T") == 16384:
        print(f"  moe_layer T={row['T']} d={row['d']} h={row['h']} E={row['E']} k={row['k']}: "
              f"efficiency {row['moe_efficiency']:.2f}, {row['moe_tflops']:.0f} TFLOP/s")
for run in result["train_throughput"]:
    if "mfu" in run:
        print(f"  train {run['label']}: {run['tokens_per_s']:,.0f} tokens/s, {run['model_tflops_per_s']:.1f} TFLOP/s, "
              f"MFU {run['mfu'] * 100:.1f}%, peak {run['peak_memory_gib']:.1f} GiB, loss {run['final_loss']:.2f}")
scale = result["model_scale"]
for name, run in scale.get("runs", {}).items():
    s = run["summary"]
    print(f"  scale {name}: largest {s.get('largest_params', 0) / 1e9:.2f}B params (E={s.get('largest_experts')}), "
          f"GPU state {s.get('gpu_state_bytes_per_param')} B/param, peak {s.get('peak_gpu_bytes_per_param')} B/param; "
          f"stopped: {s.get('stop_reason')}")
if scale.get("summary"):
    print(f"  scale summary: {json.dumps(scale['summary'])}")
print(f"  -> {target}")
PYEOF
    local failed; failed=$(awk -F'\t' '$2 != "0"' "$WORK/steps.tsv" | wc -l)
    echo "### done in $(( $(date +%s) - START ))s; steps not passed: $failed"
    rm -rf "$WORK"
    [ "$failed" -eq 0 ]
}

set -o pipefail
main "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
