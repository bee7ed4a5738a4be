#!/usr/bin/env bash
# benchmarks/gpu_check.sh: everything issue 13 asks of a GPU, in ONE call of the device tool.
#
# A session lent a GPU (the `status` tool says can_start_another: true) does exactly this:
#   1. here, once, in the project's venv (it needs this machine's package index; 80 KB):
#        bash benchmarks/gpu_check.sh --fetch-wheels
#      It fills .gpu_wheels/ (git-ignored) with the wheels of what solo's stages import and
#      the device image lacks (ml-collections), for the image's Python 3.12, manylinux x86_64.
#   2. one call of the `run` tool:
#        command:   bash benchmarks/gpu_check.sh
#        carry:     [".gpu_wheels"]
#        timeout_s: 570
#      The stages' limits add up to 480 s (8 minutes); each is killed at its own (plus what
#      the stages before it left unused), so the call ends within about 9 minutes whatever
#      hangs. The summary table prints last (the reply's output_tail: tokens/s, ms/step, MFU,
#      numerics errors per path, the tests' tally, decode tokens/s, each stage's exit). Every
#      figure and the whole log are written to $OUT as they come, so they come back even from
#      a timed-out call, and land here, read-only, under the reply's files_at: summary.json,
#      train_cudnn.json, train_xla.json, numerics.json, decode.json, log.
#   3. if a stage failed or timed out and the machine is still warm (30 s), rerun it alone at
#      once (no new start; a fresh one needs 4 minutes left): command
#      `bash benchmarks/gpu_check.sh --only train_xla` (names below, comma-separated), same
#      carry, timeout_s its limit + 60; then call give_back.
#   Put the summary's figures in README.md ("On a GPU") and experiments/gpt2_124m.py's docstring.
#
# Stages, in order of importance, each under `timeout`, each run whatever the others did (see
# LIMITS below):
#   install    20 s  the carried wheels into /tmp/solo-gpu-site (pip --no-index --no-deps
#                    --target: the image's jax, jaxlib, CUDA and cuDNN are never touched)
#   env        20 s  nvidia-smi, jax.print_environment_info(), the devices
#   train     150 s  benchmarks/train_throughput.py --size gpt2-124m: GPT-2 124M, bfloat16,
#                    32 x 1,024 tokens a step, attention auto (cuDNN on a GPU): ms/step,
#                    tokens/s, MFU against train/peaks.py's dense bf16 peak (H200: 989 TFLOP/s)
#   numerics   60 s  benchmarks/attention_numerics.py: cuDNN, XLA and einsum attention forward
#                    and gradients vs a float64/float32-highest reference (GPT-2's shape too)
#   tests      90 s  tests/test_attention.py + tests/test_precision.py on the GPU (cuDNN joins
#                    the attention paths; float32 matmuls at 'highest', see below)
#   decode     70 s  benchmarks/decode_throughput.py (bfloat16, batches 1/8/64, HF side skipped)
#   train_xla  70 s  the train stage with model.attention=xla (the reference path, for the ratio)
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--smoke] [--only STAGES] [--wheels DIR]
#   bash benchmarks/gpu_check.sh --fetch-wheels [--wheels DIR]   (FETCH_PY=3.12 by default)
#
# --dry-run prints the stages' commands; --smoke runs every stage at toy sizes on any backend
# (CPU too: how this script is tested without a GPU). PYTHON (default python3: on the device
# image the one with jax, torch and pytest) runs everything with -P, so the repository root never
# shadows the `solo` package, which is assembled in place under /tmp (symlinks, nothing
# installed). No file goes to $OUT but the six above (the device tool returns at most 8).
# benchmarks/gpu_summary.py prints the summary. GPU_CHECK_LIMITS overrides the limits' table.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/solo-gpu-check}
PY=${PYTHON:-python3}
WHEELS=.gpu_wheels
SITE=/tmp/solo-gpu-site
PKG=/tmp/solo-gpu-pkg
DRY=0
SMOKE=0
FETCH=0
ONLY=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --smoke) SMOKE=1 ;;
    --fetch-wheels) FETCH=1 ;;
    --wheels) WHEELS=$2; shift ;;
    --only) ONLY=",$2,"; shift ;;
    *) echo "gpu_check.sh: unknown option $1 (see the header)" >&2; exit 2 ;;
  esac
  shift
done
# import name -> pip name: what the stages import (solo.*, the benchmarks, the tests) that the
# device image lacks (/work/.library/device/KINDS.md's package list, 2026-11-17); pure Python
# wheels, their own requirements (absl-py, PyYAML) already in the image
NEEDS="ml_collections:ml-collections"

if [ $FETCH = 1 ]; then  # here, with a package index: the wheels for the device's Python
  v=${FETCH_PY:-3.12}
  mkdir -p "$WHEELS" && rm -f "$WHEELS"/*.whl  # one version of each: two stop the install
  for entry in $NEEDS; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d "$WHEELS" "${entry#*:}" || exit 1
  done
  ls -la "$WHEELS"; du -sh "$WHEELS"
  echo "carry [\"$WHEELS\"] in the run call (command: bash benchmarks/gpu_check.sh)"
  exit 0
fi

# each stage's own limit (seconds). The budget is the selected stages' sum (480 for all of
# them); a stage may also use what the stages before it left unused, never what the stages
# after it are owed, so the script ends inside the budget (plus 5 s a stage to kill) whatever
# hangs, and a slow first compile borrows what a quick stage saved.
LIMITS="install:20 env:20 train:150 numerics:60 tests:90 decode:70 train_xla:70"
LIMITS=${GPU_CHECK_LIMITS:-$LIMITS}
selected() { [ -z "$ONLY" ] || [ "$1" = install ] || [[ $ONLY == *",$1,"* ]]; }
OWED=0  # the limits of the selected stages not yet run
for e in $LIMITS; do selected "${e%%:*}" && OWED=$(( OWED + ${e#*:} )); done
BUDGET=$OWED

mkdir -p "$OUT"
START=$(date +%s)
LOG=$OUT/log
if [ $DRY = 0 ]; then  # this run's figures only (the device tool empties $OUT; a local run may not)
  : > "$LOG"
  rm -f "$OUT"/{summary,train_cudnn,train_xla,numerics,decode}.json
fi
RESULTS=""  # "name:rc:seconds" per stage, for the summary
step() {  # step NAME CMD...: one stage under its time limit (LIMITS), never fatal
  local name=$1 limit e; shift
  selected "$name" || return 0
  for e in $LIMITS; do [ "${e%%:*}" = "$name" ] && limit=${e#*:}; done
  OWED=$(( OWED - limit ))
  local t0; t0=$(date +%s)
  if [ $DRY = 0 ]; then  # its own limit plus what earlier stages left unused
    limit=$(( BUDGET - (t0 - START) - OWED )); [ $limit -lt 10 ] && limit=10
  fi
  echo "=== $name (limit ${limit}s, at $(( t0 - START ))s)" | tee -a "$LOG"
  if [ $DRY = 1 ]; then echo "+ $*"; return 0; fi
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local secs=$(( $(date +%s) - t0 )) how=""
  RESULTS="$RESULTS $name:$rc:$secs"
  { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && how=" (timed out)"
  echo "=== $name: exit $rc$how in ${secs}s" | tee -a "$LOG"
}

# packages the image lacks, from the carried wheels, without an index, into a folder of their
# own (--target): pip never resolves, upgrades or removes anything of the image's
install_missing() {
  local files="" missing="" entry mod whl
  for entry in $NEEDS; do
    mod=${entry%%:*}
    "$PY" -P -c "import $mod" 2>/dev/null && continue
    missing="$missing $mod"
    whl=$(ls "$WHEELS"/"$(echo "${entry#*:}" | tr - _)"-*.whl 2>/dev/null | head -1)
    [ -n "$whl" ] && files="$files $whl"
  done
  if [ -z "$missing" ]; then echo "nothing missing"; return 0; fi
  echo "missing:$missing; wheels:${files:- none}"
  if [ -z "$files" ]; then
    echo "no wheels for$missing in $WHEELS: run 'bash benchmarks/gpu_check.sh --fetch-wheels'" \
      "here and carry [\"$WHEELS\"]"; return 1
  fi
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" $files || return 1
  missing=${missing# }
  PYTHONPATH=$SITE "$PY" -P -c "import ${missing// /,}; print('installed: $missing')"
}
export PY WHEELS SITE NEEDS
export -f install_missing  # `timeout` runs programs, not shell functions
step install bash -c install_missing  # always, --only or not
# solo in place: solo/ plus each stage folder as solo.<folder> (pyproject's package-dir)
if [ $DRY = 0 ]; then
  rm -rf "$PKG" && mkdir -p "$PKG/solo"
  for f in solo/*; do ln -s "$ROOT/$f" "$PKG/solo/"; done
  for d in model objectives data train agent experiments; do ln -s "$ROOT/$d" "$PKG/solo/$d"; done
fi
export PYTHONPATH=$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

if [ $SMOKE = 1 ]; then
  SIZE="--size tiny --steps 2 --rounds 1 --warmup 1"; DEC="--batches 1 --rounds 1"
  NUM="--shapes small --paths xla"; SEL="choice or chunked"
else
  SIZE="--size gpt2-124m --steps 20 --rounds 2 --warmup 3"; DEC="--batches 1,8,64 --rounds 2"
  NUM="--shapes small,gpt2"; SEL="not gpt2 and not eight_device_mesh"  # the 8-fake-CPU mesh test is for CI
fi
envinfo() {  # read-only: nvidia-smi queries, versions, devices, the cuDNN jax finds
  command -v nvidia-smi >/dev/null && nvidia-smi --format=csv \
    --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw
  "$PY" -P - <<'PYEOF'
import importlib.metadata as md
import jax
import solo.model  # noqa: F401 - solo imports on this image
jax.print_environment_info()
print(jax.devices(), [d.device_kind for d in jax.devices()])
def version(p):
    try:
        return md.version(p)
    except md.PackageNotFoundError:
        return "missing"
print({p: version(p) for p in ("flax", "optax", "orbax-checkpoint", "ml-collections", "pytest")})
try:  # private API: only a diagnostic
    from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
    print("cudnn", check_cudnn_version())
except Exception as e:  # noqa: BLE001
    print("cudnn: not found or unknown:", type(e).__name__, str(e)[:120])
PYEOF
}
export -f envinfo
step env bash -c envinfo
step train "$PY" -P benchmarks/train_throughput.py $SIZE --json "$OUT/train_cudnn.json"
step numerics "$PY" -P benchmarks/attention_numerics.py $NUM --json "$OUT/numerics.json"
# the tests' float32 tolerances are float32's (2e-5): on a GPU, float32 matmuls default to TF32
# (~1e-3), so they run at 'highest' (a no-op on CPU); the bfloat16/cuDNN checks are unaffected
step tests env JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -P -m pytest -q -p no:cacheprovider \
  tests/test_attention.py tests/test_precision.py -k "$SEL and not gpu_check"
step decode "$PY" -P benchmarks/decode_throughput.py --skip-hf $DEC --json "$OUT/decode.json"
step train_xla "$PY" -P benchmarks/train_throughput.py $SIZE --set attention=xla \
  --json "$OUT/train_xla.json"
[ $DRY = 1 ] && exit 0

echo "=== summary (in $(( $(date +%s) - START ))s; figures in $OUT)" | tee -a "$LOG"
RESULTS=$RESULTS timeout 20 "$PY" -P benchmarks/gpu_summary.py "$OUT" 2>&1 | tee -a "$LOG"
