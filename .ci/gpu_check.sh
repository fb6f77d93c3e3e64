#!/usr/bin/env bash
# One prepared GPU run of dit4dit, from the repository root on a bare GPU machine whose
# python3 has torch (CUDA build), nvcc and ninja; gymnasium and mujoco come as carried wheels.
#   1. build kernels/_C for this GPU's architecture only, and print the build time;
#   2. run the CUDA kernel tests (tests/test_kernels_cuda.py and the on-device half of
#      tests/test_cuda_emulated.py) with DIT4DIT_KERNELS=1;
#   3. benchmark each op against SDPA (flash, efficient, cuDNN) and eager adaLN, toy and paper shapes;
#   4. time predict_action of the paper preset (bf16, batch 1): early exit + cached K/V against
#      the release's path, with the fused kernels and with DIT4DIT_KERNELS=0;
#   5. time the paper preset's training step (fp32 weights, bf16 autocast, AdamW) at batch 1, 2,
#      4, ... per GPU with its peak memory, up to the first out-of-memory or 60 s: the largest
#      batch that fits (no activation checkpointing);
#   6. train the toy preset for 100 steps on carried episodes (DiT4DiT, --action-only, and
#      DiT4DiT with DIT4DIT_KERNELS=0), seconds per step;
#   7. the CPU kernel tests (tests/test_kernels.py) if time is left; then a summary table.
# A failing step is recorded and the next one runs; the exit status is non-zero if any failed.
# Every step has a time limit inside one overall budget (GPU_CHECK_BUDGET seconds, default 530:
# the device call's 600 s at most, less the wheels' install and the summary).
# Log: $OUT/gpu_check.log; results: $OUT/gpu_results.jsonl (one JSON object per step).
#
#   GPU_CHECK_CPU_SMOKE=1 bash .ci/gpu_check.sh # dry run here: every step at tiny sizes on the CPU
#
# Before a device run, once, in the repository root of the machine that calls the device tool
# (both folders are git-ignored through .git/info/exclude and travel with the call's `carry`):
#   echo /.whl/ >> .git/info/exclude; echo /.gpu_data/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     gymnasium==1.4.0 farama-notifications==0.0.6 mujoco==3.3.7 pyopengl==3.1.10 glfw==2.11.0
#   PYTHONPATH=. python bench/gpu.py make-data --out .gpu_data --demos-per-task 10
# Then the device call: carry [".whl", ".gpu_data"], timeout_s 580, command
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
#   .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash .ci/gpu_check.sh
# (mujoco 3.3.7: one wheel, where 4.x needs three; training from --data renders nothing, and
# without EGL libraries on the machine the training runs fall back to MUJOCO_GL=disable.)
#
# The results of its runs, with their dates and machines: docs/kernels.md.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-/tmp/dit4dit_gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MUJOCO_GL="${MUJOCO_GL:-egl}" MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # bench/gpu.py imports dit4dit and kernels
PY="${PY:-python3}"
SMOKE="${GPU_CHECK_CPU_SMOKE:-0}"
export OUT PY SMOKE
DATA="${GPU_CHECK_DATA:-.gpu_data}"
RESULTS="$OUT/gpu_results.jsonl"
START=$(date +%s)
DEADLINE=$(( START + ${GPU_CHECK_BUDGET:-530} ))
FAILED=()

# step KEY NAME LIMIT_S COMMAND...: run with a time limit (cut to what is left of the budget),
# print its status and wall time, record a failure and go on. GPU_CHECK_ONLY="KEY ..." runs only
# those steps (keys: env shapes build tests ops predict paper-train train cputests), e.g. to rerun the
# benchmarks on a machine that is still warm and keeps kernels/_C from the first call.
step() {
  local key=$1 name=$2 limit=$3 left rc t0
  shift 3
  if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " $GPU_CHECK_ONLY " != *" $key "* ]]; then
    echo "== $name: not selected (GPU_CHECK_ONLY=$GPU_CHECK_ONLY)"
    return
  fi
  left=$(( DEADLINE - $(date +%s) ))
  if (( left < 20 )); then
    echo "== $name: SKIPPED, ${left}s of the budget left"
    FAILED+=("$name (skipped: out of time)")
    return
  fi
  (( limit > left )) && limit=$left
  echo
  echo "== $name  [limit ${limit}s, t=$(( $(date +%s) - START ))s]"
  t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  rc=$?
  echo "== $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED rc=$rc$([ $rc -eq 124 ] && echo ' (time limit)')")" \
       "in $(( $(date +%s) - t0 ))s"
  (( rc == 0 )) || FAILED+=("$name (rc $rc)")
}

# A CUDA toolkit: bin/nvcc, include/cuda_runtime.h and the runtime library (as .ci/build_cuda.sh).
find_cuda_home() {
  local c
  for c in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13.0 \
      "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /none/bin/nvcc)")")")"; do
    if [ -n "$c" ] && [ -x "$c/bin/nvcc" ] && [ -f "$c/include/cuda_runtime.h" ]; then echo "$c"; return; fi
  done
}

build() {
  local cap log t0
  if [ "$SMOKE" = 1 ]; then
    if "$PY" -c 'import kernels, sys; sys.exit(not kernels.available())'; then
      echo "kernels._C already built here: reused (CPU dry run)"; return 0
    fi
    "$PY" setup.py -q build_ext --inplace; return
  fi
  cap=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || return 1
  CUDA_HOME="$(find_cuda_home)"
  [ -n "$CUDA_HOME" ] || { echo "no CUDA toolkit found (nvcc: $(command -v nvcc))"; return 1; }
  export CUDA_HOME FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$cap"
  echo "CUDA_HOME=$CUDA_HOME  nvcc $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*')" \
       " TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST  MAX_JOBS=$MAX_JOBS  $(nproc) cores"
  log="$OUT/build.log"
  t0=$(date +%s)
  if ! "$PY" setup.py build_ext --inplace --force --build-temp /tmp/dit4dit_build >"$log" 2>&1; then
    grep -E "error|Error" "$log" | head -n 40
    tail -n 20 "$log"
    echo "build FAILED after $(( $(date +%s) - t0 ))s"
    return 1
  fi
  echo "build time: $(( $(date +%s) - t0 ))s (sm_${cap/./} only; full log $log)"
  "$PY" -c 'import kernels, torch
assert kernels.available(), kernels.load_error()
cuda = [torch._C._dispatch_has_kernel_for_dispatch_key("dit4dit::" + op, "CUDA")
        for op in ("attention_fwd", "attention_bwd", "adaln_modulate_fwd", "adaln_modulate_bwd",
                   "residual_modulate_fwd", "residual_modulate_bwd", "qk_norm_rope_fwd", "qk_norm_rope_bwd")]
print("kernels._C loads; CUDA kernels registered:", cuda)
assert all(cuda), "kernels._C has no CUDA kernels"'
}

cuda_tests() {
  DIT4DIT_KERNELS=$([ "$SMOKE" = 1 ] && echo auto || echo 1) "$PY" -m pytest -q -rfEs -p no:cacheprovider \
    tests/test_kernels_cuda.py tests/test_cuda_emulated.py::test_adaln_on_device \
    tests/test_cuda_emulated.py::test_adaln_on_device_one_feature \
    tests/test_cuda_emulated.py::test_attention_on_device \
    tests/test_cuda_emulated.py::test_residual_modulate_on_device \
    tests/test_cuda_emulated.py::test_qk_norm_rope_on_device
}

# The bad-input tests (the ops' C++ error paths) first in a fresh process of their own, then the
# whole file: on the H200 run the whole file segfaulted in the first C++ error path after
# test_opcheck_all_ops and test_torch_compile_fullgraph, and the first run says whether the crash
# needs those earlier tests in the same process.
cpu_kernel_tests() {
  local rc=0
  DIT4DIT_KERNELS=1 "$PY" -m pytest -q -rfE -p no:cacheprovider tests/test_kernels.py -k bad_inputs || rc=$?
  DIT4DIT_KERNELS=1 "$PY" -m pytest -q -rfE -p no:cacheprovider tests/test_kernels.py || rc=$?
  return $rc
}

# Carried wheels (.whl/, see the README's GPU section) when gymnasium or mujoco is missing: the
# run command usually installs them first, as the device README says; this covers a bare call.
install_wheels() {
  if [ -d .whl ] && ! "$PY" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("gymnasium") and u.find_spec("mujoco")))'; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site" && echo "installed the carried wheels into /tmp/site: $(ls .whl | tr '\n' ' ')"
  fi
}

export -f find_cuda_home build cuda_tests cpu_kernel_tests

main() {
  local smoke_flag=()
  install_wheels
  [ "$SMOKE" = 1 ] && smoke_flag=(--cpu-smoke)
  echo "dit4dit GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
       "$(git diff --quiet HEAD 2>/dev/null || echo '+ uncommitted changes')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | head -n 4
  echo "python $("$PY" -c 'import sys; print(sys.version.split()[0])'), $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'),"\
       "MUJOCO_GL=$MUJOCO_GL, EGL: $(ldconfig -p 2>/dev/null | grep -c 'libEGL.so') libEGL entries"
  [ -n "${GPU_CHECK_ONLY:-}" ] || rm -f "$RESULTS"

  step env "env and ceilings" 60 "$PY" bench/gpu.py env "${smoke_flag[@]}" --json "$RESULTS"
  step shapes "shapes" 30 "$PY" bench/gpu.py shapes --json "$RESULTS"
  step build "build" 270 bash -c build
  step tests "CUDA kernel tests" 150 bash -c cuda_tests
  step ops "ops benchmark" 100 "$PY" bench/gpu.py ops "${smoke_flag[@]}" --json "$RESULTS" \
       $([ "$SMOKE" = 1 ] && echo --reps 3)
  step predict "predict_action (paper preset)" 120 "$PY" bench/gpu.py predict "${smoke_flag[@]}" --presets paper toy \
       --json "$RESULTS" $([ "$SMOKE" = 1 ] && echo --repeats 3)
  step paper-train "training step (paper preset), largest batch" 90 "$PY" bench/gpu.py paper-train \
       "${smoke_flag[@]}" --budget-s 60 --json "$RESULTS"
  step train "train_toy (toy preset)" 150 "$PY" bench/gpu.py train "${smoke_flag[@]}" --data "$DATA" --steps 100 \
       --with-torch-backend --timeout 70 --json "$RESULTS"
  step cputests "CPU kernel tests (tests/test_kernels.py)" 90 bash -c cpu_kernel_tests

  echo
  "$PY" bench/gpu.py summary --json "$RESULTS"
  echo "total $(( $(date +%s) - START ))s"
  if (( ${#FAILED[@]} )); then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    return 1
  fi
  echo "all steps passed"
}

main 2>&1 | tee "$OUT/gpu_check.log"
