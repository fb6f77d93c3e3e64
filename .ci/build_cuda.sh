#!/usr/bin/env bash
# Compiles the CUDA kernels of dit4dit (kernels/csrc/cuda/*.cu, together with the CPU
# sources) into kernels/_C in place, for sm_80 and sm_90, on a machine without a GPU
# (FORCE_CUDA=1), with `ptxas -v`; prints registers / spills / shared memory per kernel and
# imports kernels._C to prove the extension loads. Fails loudly when no CUDA toolkit or no
# CUDA build of torch is found.
#   CUDA_HOME      toolkit to use (default: /usr/local/cuda-13.0, else /usr/local/cuda, else the
#                  toolkit of the nvcc on PATH)
#   TORCH_CUDA_ARCH_LIST  architectures (default "8.0;9.0")
#   MAX_JOBS       parallel compiler jobs (default 1)
set -euo pipefail
cd "$(dirname "$0")/.."

# A toolkit is a folder with bin/nvcc, include/cuda_runtime.h and the runtime library
# (/usr/local/bin/nvcc may be a wrapper script, so nvcc's folder alone does not say where).
is_toolkit() { [ -x "$1/bin/nvcc" ] && [ -f "$1/include/cuda_runtime.h" ] && ls "$1"/lib*/libcudart.so* >/dev/null 2>&1; }
if [ -z "${CUDA_HOME:-}" ]; then
  for candidate in /usr/local/cuda-13.0 /usr/local/cuda \
      "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent/bin/nvcc)")")")"; do
    if is_toolkit "$candidate"; then CUDA_HOME="$candidate"; break; fi
  done
fi
if [ -z "${CUDA_HOME:-}" ] || ! is_toolkit "$CUDA_HOME"; then
  echo "build_cuda.sh: ERROR: no CUDA toolkit found (CUDA_HOME=${CUDA_HOME:-unset}; need bin/nvcc," \
       "include/cuda_runtime.h and lib64/libcudart.so); install one or set CUDA_HOME" >&2
  exit 1
fi
if ! python -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  echo "build_cuda.sh: ERROR: the installed torch is not a CUDA build (torch.version.cuda is None)" >&2
  exit 1
fi
export CUDA_HOME FORCE_CUDA=1 DIT4DIT_PTXAS_VERBOSE=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-1}"
echo "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1)"
echo "torch: $(python -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
echo "archs: $TORCH_CUDA_ARCH_LIST"

log="$(mktemp -t dit4dit_build_cuda.XXXXXX.log)"
start=$(date +%s)
# Separate temp dir: the CUDA objects do not mix with those of the CPU-only build.
if ! python setup.py build_ext --inplace --force --build-temp build/cuda-temp >"$log" 2>&1; then
  grep -E "error|Error" "$log" | head -n 40 >&2 || true
  echo "build_cuda.sh: ERROR: the CUDA build failed; full log: $log" >&2
  exit 1
fi
echo "compiled in $(( $(date +%s) - start )) s (log: $log)"

# Registers, spills and shared memory of every kernel, from the ptxas -v lines.
python - "$log" <<'PY'
import re
import shutil
import subprocess
import sys

rows, current, stack = [], None, {}
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
    if m:
        current = (m.group(2), m.group(1))
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and current:
        stack[current] = tuple(int(g) for g in m.groups())
        continue
    m = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)
    if m and current:
        frame, st, ld = stack.get(current, (0, 0, 0))
        rows.append((current[0], current[1], int(m.group(1)), st, ld, int(m.group(2) or 0)))
        current = None
if not rows:
    sys.exit("build_cuda.sh: ERROR: no ptxas -v output found in the build log")
names = [r[1] for r in rows]
if shutil.which("c++filt"):
    names = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
short = []
for name in names:
    name = name.replace("dit4dit_cuda::", "").replace("__nv_bfloat16", "bf16").replace("__half", "half")
    short.append(re.sub(r"\(.*\)$", "", re.sub(r"^void ", "", name)))
print(f"{'arch':6} {'regs':>4} {'spill st/ld':>11} {'smem':>6}  kernel")
for (arch, _, regs, st, ld, smem), name in sorted(zip(rows, short), key=lambda p: (p[0][0], p[1])):
    print(f"{arch:6} {regs:4d} {f'{st}/{ld}':>11} {smem:6d}  {name}")
spilling = sum(1 for r in rows if r[3] or r[4])
print(f"{len(rows)} kernels, {spilling} with spills, max {max(r[2] for r in rows)} registers")
PY

python -c 'import kernels._C, torch; print("kernels._C loads:", kernels._C.__file__); print("CUDA kernels registered:", *(torch._C._dispatch_has_kernel_for_dispatch_key("dit4dit::" + op, "CUDA") for op in ("attention_fwd", "adaln_modulate_fwd", "residual_modulate_fwd", "qk_norm_rope_fwd")))'
