#!/usr/bin/env bash
# Run the test suite, the benchmarks and the plots on a machine with a CUDA GPU.
#
# Assumes torch and Triton are preinstalled and there is no network; the repository is the
# working directory (or this script's parent) and goes on PYTHONPATH. Everything is written under
# bench/results/<device-slug>/ (and copied to $OUT when that is set). Each part fits one
# 10-minute command (an outer `timeout` per part, an inner time budget for the benchmarks):
#
#   tools/gpu_run.sh list          the parts, for this checkout
#   tools/gpu_run.sh tests         pytest tests on the GPU (TRITON_INTERPRET unset): log + junit xml
#   tools/gpu_run.sh report        tools/kernel_report.py (sm_90, sm_80) -> kernel_report.{txt,json}
#   tools/gpu_run.sh quick         python -m bench: every op at its quick GPU shapes + model quick
#   tools/gpu_run.sh ops-<group>   python -m bench --full --ops <group> (groups: see `list`)
#   tools/gpu_run.sh ops           every ops-<group> in turn (several commands' worth)
#   tools/gpu_run.sh model         python -m bench --full --model (decode B=1,32 x context 512..8k)
#   tools/gpu_run.sh train         the train suite (one AdamW step, mythos_1b dims, bf16, 16k tokens:
#                                  tokens/s, MFU vs the measured matmul peak, peak memory) + the
#                                  linear_ce op bench (fused loss vs eager logits, time and memory)
#   tools/gpu_run.sh dist          torchrun (1 process, NCCL): a few bf16 steps of mythos_1b dims under
#                                  --dist fsdp and --dist ddp; losses finite and equal within bf16
#                                  tolerance -> dist_check.json
#   tools/gpu_run.sh adaptive      python -m bench --model --suites adaptive (early exit, speculative)
#   tools/gpu_run.sh plots         PNGs from results.jsonl
#   tools/gpu_run.sh all           tests report ops model adaptive plots (far more than 10 minutes)
#
# Several parts in one call run in order: `tools/gpu_run.sh tests report`.
# The results rows carry the git commit; where the checkout has no .git, pass it in:
#   MYTHOS_COMMIT=abc123 tools/gpu_run.sh tests
# Environment: PYTHON (default python3), PART_TIMEOUT (seconds, default 570), BENCH_BUDGET
# (seconds of measurements per benchmark part, default 460), OUT (extra copy of the results),
# RESULTS_DIR (default bench/results/<device-slug>), PYTEST_ARGS (more pytest arguments for
# `tests`, e.g. "-n 8" with pytest-xdist on a 16-core machine).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [ "$#" -eq 0 ]; then
  awk 'NR > 1 && /^set -uo/ {exit} NR > 1' "$0"
  exit 2
fi
PY="${PYTHON:-python3}"
PART_TIMEOUT="${PART_TIMEOUT:-570}"
BENCH_BUDGET="${BENCH_BUDGET:-460}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
export MYTHOS_BACKEND="${MYTHOS_BACKEND:-auto}"
export PYTHONUNBUFFERED=1

SLUG="$("$PY" -c 'from bench.devinfo import default_device, device_slug; print(device_slug(default_device()))' 2>/dev/null || echo unknown-device)"
RES="${RESULTS_DIR:-bench/results/$SLUG}"
LOGS="$RES/logs"
mkdir -p "$LOGS"
# the ceilings measured on this device are cached (and committed) beside its results
case "$RES" in /*) export MYTHOS_CACHE_DIR="$RES" ;; *) export MYTHOS_CACHE_DIR="$REPO/$RES" ;; esac

groups() {
  "$PY" - <<'EOF'
from bench.harness import all_ops
print(" ".join(sorted({op.group for op in all_ops().values()})))
EOF
}

copy_out() {
  # $OUT brings back at most 8 files, 2 folders deep: one tarball of the results folder
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/results-$SLUG.tgz" -C "$RES" . 2>/dev/null || true
  fi
}

env_record() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: ${MYTHOS_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
    # open-mythos's GQA attention runs flash-attn in bf16 whenever it imports, even for an fp32
    # model: parity and autocast-error tests read differently with it
    "$PY" -c 'import importlib.util as u; print("flash_attn", "installed" if u.find_spec("flash_attn") else "absent")' 2>&1
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv 2>&1 || true
  } > "$RES/env.txt" 2>&1
}

# run NAME CMD...: one part under `timeout`, logged to $LOGS/NAME.log; returns its status
run() {
  local name="$1"; shift
  echo "=== [$name] $* (timeout ${PART_TIMEOUT}s) -> $LOGS/$name.log"
  local t0=$SECONDS
  timeout --kill-after=20 "$PART_TIMEOUT" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== [$name] exit $rc after $((SECONDS - t0))s" | tee -a "$LOGS/$name.log"
  copy_out
  return "$rc"
}

part() {
  case "$1" in
    list)
      echo "parts: tests report quick $(for g in $(groups); do printf 'ops-%s ' "$g"; done)model train dist adaptive plots"
      ;;
    tests)
      if ! "$PY" -c 'import pytest' 2>/dev/null; then
        echo "gpu_run.sh: pytest is not installed for $PY (no network to install it)" >&2
        return 3
      fi
      local extra=()
      if "$PY" -c 'import pytest_benchmark' 2>/dev/null; then extra+=(--benchmark-disable); fi
      # -rfE: failure summaries in the log even when the part is cut by its timeout later;
      # --durations: where the time goes;
      # noshrink: a failing hypothesis example is reported at once, not shrunk for minutes
      export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-noshrink}"
      # shellcheck disable=SC2086 # PYTEST_ARGS is a list of words
      run tests "$PY" -m pytest tests -q -p no:cacheprovider ${extra[@]+"${extra[@]}"} ${PYTEST_ARGS:-} \
        -rfE --durations=25 --junitxml="$RES/junit.xml" -o junit_family=xunit2
      ;;
    report)
      run report bash -c "\"$PY\" tools/kernel_report.py --json --progress > \"$RES/kernel_report.json\""
      local rc=$?
      PYTHONPATH="$REPO/tools:$PYTHONPATH" "$PY" - "$RES/kernel_report.json" > "$RES/kernel_report.txt" <<'EOF' || true
import json, sys
from kernel_report import format_table
print(format_table(json.load(open(sys.argv[1]))))
EOF
      return "$rc"
      ;;
    quick)
      run quick "$PY" -m bench --out "$RES" --no-plot --time-budget "$BENCH_BUDGET"
      ;;
    ops)
      local rc=0
      for g in $(groups); do part "ops-$g" || rc=$?; done
      return "$rc"
      ;;
    ops-*)
      local g="${1#ops-}"
      run "ops-$g" "$PY" -m bench --full --ops "$g" --no-model --no-plot --out "$RES" \
        --time-budget "$BENCH_BUDGET"
      ;;
    model)
      run model "$PY" -m bench --full --model --no-plot --out "$RES" --time-budget "$BENCH_BUDGET"
      ;;
    train)
      local rc=0
      run train "$PY" -m bench --model --suites train --no-plot --out "$RES" || rc=$?
      run ops-linear_ce "$PY" -m bench --full --ops linear_ce --no-model --no-plot --out "$RES" \
        --time-budget "$BENCH_BUDGET" || rc=$?
      return "$rc"
      ;;
    dist)
      local rc=0 d
      for d in fsdp ddp; do
        rm -rf "$RES/dist_$d"
        run "dist-$d" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m mythos.train \
          --config mythos_1b --task pointer --steps 4 --batch-size 4 --seq-len 512 --warmup 1 \
          --dtype bf16 --device cuda --dist "$d" --eval-every 0 --save-every 0 --log-every 1 \
          --no-progress --out "$RES/dist_$d" || rc=$?
      done
      run dist-check "$PY" -c '
import json, math, sys
res = sys.argv[1]
loss = {d: [r["loss"] for r in map(json.loads, open(f"{res}/dist_{d}/metrics.jsonl")) if "loss" in r]
        for d in ("fsdp", "ddp")}
ok = len(loss["fsdp"]) == len(loss["ddp"]) > 0 and all(
    math.isfinite(a) and math.isfinite(b) and abs(a - b) <= 3e-2 * max(1.0, abs(b))
    for a, b in zip(loss["fsdp"], loss["ddp"]))
json.dump({"losses": loss, "rtol": 3e-2, "ok": ok}, open(f"{res}/dist_check.json", "w"), indent=1)
print(json.dumps(loss), "ok" if ok else "MISMATCH")
sys.exit(0 if ok else 1)' "$RES" || rc=$?
      return "$rc"
      ;;
    adaptive)
      run adaptive "$PY" -m bench --model --suites adaptive --no-plot --out "$RES"
      ;;
    plots)
      run plots "$PY" -m bench.plot "$RES/results.jsonl" --out "$RES"
      ;;
    all)
      local rc=0
      for p in tests report ops model adaptive plots; do part "$p" || rc=$?; done
      return "$rc"
      ;;
    *)
      echo "unknown part '$1' (try: tools/gpu_run.sh list)" >&2
      return 2
      ;;
  esac
}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_run.sh: no CUDA GPU visible to torch; results would land in $RES (continuing)" >&2
fi
env_record
status=0
for p in "$@"; do
  part "$p" || status=$?
done
echo "results under $RES (status $status)"
exit "$status"
