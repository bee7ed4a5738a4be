#!/usr/bin/env bash
# One call on a GPU machine measures what issue 13 asks of a GPU; the stages' time limits add up
# to 8 minutes (480 s), so it ends within them on one H200 whatever hangs:
#   1. the numerics tests on the GPU: every attention path (einsum, xla, splash in interpret
#      mode, cuDNN) against a float64 reference on packed segments, causal/bidirectional, GQA, no
#      leak across packed documents; chunked cross-entropy == whole; remat gradients
#      (tests/test_attention.py, tests/test_precision.py without the CPU-only memory test);
#   2. benchmarks/train_throughput.py --size gpt2-124m: bfloat16, all local devices, MFU against
#      the device's data-sheet peak (train/peaks.py), once with attention=auto (cuDNN) and once
#      with the XLA reference attention;
#   3. benchmarks/decode_throughput.py on the GPU (bfloat16, HF side skipped).
# Figures go to stdout and $OUT (default /tmp/solo-gpu-check): train_*.json, decode.json, log.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--wheels DIR] [--smoke]
#
# The device image has jax[cuda], flax, optax, orbax, torch and transformers; what else solo
# imports (ml_collections, cloudpickle, filelock, sentencepiece, pytest + pluggy + iniconfig) is
# installed from DIR (--wheels, default .gpu_wheels; `bash benchmarks/gpu_check.sh
# --fetch-wheels` fills it from this machine's package index, for Python 3.10-3.13), and only
# where an import fails. solo itself is used in place (a symlinked package, nothing installed).
# --dry-run prints the commands; --smoke runs everything at toy sizes (any backend, CPU too: how
# this script is tested without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/solo-gpu-check}
WHEELS=.gpu_wheels
DRY=0
SMOKE=0
FETCH=0
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --smoke) SMOKE=1 ;;
    --wheels) WHEELS=$2; shift ;;
    --fetch-wheels) FETCH=1 ;;
    *) echo "gpu_check.sh: unknown option $1 (see the header)" >&2; exit 2 ;;
  esac
  shift
done
PKGS="ml_collections cloudpickle filelock sentencepiece pytest pluggy iniconfig"

if [ $FETCH = 1 ]; then  # here, with a package index: pure wheels once, binary ones per Python
  mkdir -p "$WHEELS"
  pip download --no-deps -d "$WHEELS" ml_collections cloudpickle filelock pytest pluggy iniconfig
  for v in 3.10 3.11 3.12 3.13; do
    pip download --no-deps --only-binary=:all: --python-version $v \
      --platform manylinux2014_x86_64 -d "$WHEELS" sentencepiece || true
  done
  ls -la "$WHEELS"; exit 0
fi

mkdir -p "$OUT"
START=$(date +%s)
LOG=$OUT/log
: > "$LOG"
step() {  # step SECONDS NAME CMD...: one stage under its own time limit, never fatal
  local limit=$1 name=$2; shift 2
  echo "=== $name (limit ${limit}s, at $(( $(date +%s) - START ))s)" | tee -a "$LOG"
  if [ $DRY = 1 ]; then echo "+ $*"; return 0; fi
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc" | tee -a "$LOG"
}

# packages: what the image lacks, from the carried wheels, without an index
missing=""
for p in $PKGS; do python -c "import $p" 2>/dev/null || missing="$missing $p"; done
if [ -n "$missing" ]; then
  step 60 "install$missing" pip install --no-index --find-links "$WHEELS" --no-deps $missing
fi
# solo in place: solo/ plus each stage folder as solo.<folder> (pyproject's package-dir)
PKG=$OUT/pkg
rm -rf "$PKG" && mkdir -p "$PKG/solo"
for f in solo/*; do ln -s "$ROOT/$f" "$PKG/solo/"; done
for d in model objectives data train agent experiments; do ln -s "$ROOT/$d" "$PKG/solo/$d"; done
export PYTHONPATH=$PKG${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

step 30 "devices" python -c "import jax, solo; print(jax.devices(), jax.__version__)"
step 120 "numerics tests" python -m pytest -q -x -p no:cacheprovider tests/test_attention.py \
  tests/test_precision.py -k "not gpt2"
if [ $SMOKE = 1 ]; then
  SIZE="--size tiny --steps 2 --rounds 1 --warmup 1"; DEC="--batches 1 --rounds 1"
else
  SIZE="--size gpt2-124m --steps 20 --rounds 2 --warmup 3"; DEC="--batches 1,8,64 --rounds 2"
fi
step 120 "train_throughput (attention auto)" python benchmarks/train_throughput.py $SIZE \
  --json "$OUT/train_auto.json"
step 90 "train_throughput (attention xla)" python benchmarks/train_throughput.py $SIZE \
  --set attention=xla --json "$OUT/train_xla.json"
step 60 "decode_throughput" python benchmarks/decode_throughput.py --skip-hf $DEC \
  --json "$OUT/decode.json"
echo "=== done in $(( $(date +%s) - START ))s; figures in $OUT" | tee -a "$LOG"
