#!/usr/bin/env bash
# The one-shot device check: build the CUDA extension, run every requires_gpu test, time the kernels, run the
# reference vs fast samplers on a random NLD-8B-shaped model, print one table last, write JSON under $OUT.
#
#   bash benchmarks/gpu/run.sh            # on one CUDA GPU, offline, at most ~8 minutes
#   bash benchmarks/gpu/run.sh --dry-run  # every step on the CPU with a tiny checkpoint (CI)
#
# Each stage runs under its own timeout; a failing or timed-out stage is reported in the table and the later
# stages still run. Results: $OUT/{env,build,tests,kernels,samplers,summary}.json ($OUT defaults to ./gpu-out).
set -u

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "usage: bash benchmarks/gpu/run.sh [--dry-run]" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT"/env.json "$OUT"/build.json "$OUT"/tests.json "$OUT"/kernels.json "$OUT"/samplers.json "$OUT"/summary.json
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1
PY="${PYTHON:-python}"
DRYFLAG=()
[ "$DRY" = 1 ] && DRYFLAG=(--dry-run)

# Time boxes in seconds (real run; the dry run is small): 8 minutes in all.
if [ "$DRY" = 1 ]; then
  T_BUILD=60 T_TESTS=60 T_KERNELS=60 T_SAMPLERS=90
else
  T_BUILD=120 T_TESTS=90 T_KERNELS=60 T_SAMPLERS=190
fi

# stage_json NAME OK DETAIL: a shell stage's record.
stage_json() {
  "$PY" - "$OUT/$1.json" "$2" "$3" <<'EOF'
import json, sys
path, ok, detail = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
json.dump({"ok": ok, "detail": detail[-600:]}, open(path, "w"), indent=1)
EOF
}

echo "== env"
ENV_LINE="$(timeout 60 "$PY" -c 'import sys, torch, triton; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, cuda {torch.version.cuda}, gpu {torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}")' 2>&1)"
RC=$?
echo "$ENV_LINE"
stage_json env $([ $RC = 0 ] && echo 1 || echo 0) "$ENV_LINE"

echo "== build"
# kernels/ is the package nemotron_fast.kernels only through the installed package's mapping (setup.py's
# package_dir), so a bare checkout cannot import nemotron_fast: install it editable first, offline and without
# the extension (built in place below); if pip cannot, link kernels/ into the package for this run only.
KERNELS_LINK=""
importable() { "$PY" -c 'import nemotron_fast.kernels' >/dev/null 2>&1; }
if ! importable; then
  NEMOTRON_FAST_SKIP_CUDA=1 timeout "$T_BUILD" "$PY" -m pip install -q --no-deps --no-build-isolation --no-index \
    -e "$ROOT" >"$OUT/pip-install.log" 2>&1
  if ! importable && [ ! -e "$ROOT/nemotron_fast/kernels" ]; then
    ln -s ../kernels "$ROOT/nemotron_fast/kernels" && KERNELS_LINK="$ROOT/nemotron_fast/kernels"
    trap '[ -n "$KERNELS_LINK" ] && rm -f "$KERNELS_LINK"' EXIT
  fi
fi
if [ "$DRY" = 1 ]; then
  # No CUDA here: check that the package imports and report whether the extension is present.
  LOG="$(timeout "$T_BUILD" "$PY" -c 'from nemotron_fast import _ops; print("dry run: extension not built;", "nemotron_fast._C loaded" if _ops.HAS_CUDA_EXTENSION else _ops.CUDA_EXTENSION_ERROR)' 2>&1)"
  RC=$?
else
  # --no-deps / --no-build-isolation: nothing is downloaded, the installed torch builds the extension in place.
  LOG="$(NEMOTRON_FAST_FORCE_CUDA=1 timeout "$T_BUILD" "$PY" setup.py build_ext --inplace 2>&1 | tail -n 5; \
         "$PY" -c 'from nemotron_fast import _ops; assert _ops.HAS_CUDA_EXTENSION, _ops.CUDA_EXTENSION_ERROR; print("nemotron_fast._C loaded")' 2>&1)"
  RC=$?
fi
echo "$LOG" | tail -n 3
stage_json build $([ $RC = 0 ] && echo 1 || echo 0) "$LOG"

echo "== tests (requires_gpu)"
# Only the files that hold requires_gpu tests: collecting all of tests/ imports the server's tests, which need
# FastAPI (absent on the device image), and one collection error stops pytest before any test runs.
mapfile -t GPU_TESTS < <(grep -rlE --include='test_*.py' 'mark\.requires_gpu' tests | sort)
# pipefail: the status is pytest's (or timeout's 124), not tail's.
if [ "$DRY" = 1 ]; then
  LOG="$(set -o pipefail; timeout "$T_TESTS" "$PY" -m pytest -q -m requires_gpu --collect-only -p no:cacheprovider \
         "${GPU_TESTS[@]}" 2>&1 | tail -n 1)"
  RC=$?
else
  LOG="$(set -o pipefail; timeout "$T_TESTS" "$PY" -m pytest -q -m requires_gpu -p no:cacheprovider "${GPU_TESTS[@]}" \
         2>&1 | tail -n 15)"
  RC=$?
fi
[ $RC = 124 ] && LOG="$LOG
timed out after ${T_TESTS}s"
echo "$LOG" | tail -n 3
stage_json tests $([ $RC = 0 ] && echo 1 || echo 0) "$(echo "$LOG" | tail -n 1)"

echo "== kernels"
timeout "$T_KERNELS" "$PY" -m benchmarks.gpu.check kernels --out "$OUT" "${DRYFLAG[@]}" \
  || [ -f "$OUT/kernels.json" ] || stage_json kernels 0 "timed out after ${T_KERNELS}s or crashed"

echo "== samplers"
# The stage stops starting batch sizes 20 s before its time box.
timeout "$T_SAMPLERS" "$PY" -m benchmarks.gpu.check samplers --out "$OUT" --budget $((T_SAMPLERS - 20)) "${DRYFLAG[@]}" \
  || [ -f "$OUT/samplers.json" ] || stage_json samplers 0 "timed out after ${T_SAMPLERS}s or crashed"

echo "== table"
"$PY" -m benchmarks.gpu.check table --out "$OUT"
