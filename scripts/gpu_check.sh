#!/usr/bin/env bash
# The GPU check, one command, at most 7 minutes on one H100/H200, each part under its own time limit:
#   bash scripts/gpu_check.sh [--out FILE] [--dry-run]        (default FILE: gpu_check.md)
#   bash scripts/gpu_check.sh --download                       (here, with a network: fill .gpu/ first)
# A lent GPU machine has Python 3.12, torch, torchvision, pytest, pytest-xdist and tqdm, but no network and none of
# hydra-core, omegaconf, antlr4, pydantic (pydantic-core), submitit. --download puts their wheels for Python 3.12 on
# manylinux x86-64 in .gpu/wheels (antlr4 4.9.3 has none on PyPI: pip wheel builds it here) and a copy of
# Fashion-MNIST's four .gz files in .gpu/fashion-mnist; .gpu/ is git-ignored, 34 MB, and travels with the tree.
# There they are installed with pip install --no-index --no-deps --target into a temporary folder (the machine's own
# Python may not be writable), put first on PYTHONPATH. wandb is not needed: every part runs with logger=none.
# Parts, in this order: the cuda-marked tests (breakage shows before any timing), scripts/gpu_check.py's optim, loop
# and decode rows, then the default run and the LARS 32k run, timed start to exit with their test accuracy. Rows go
# to FILE as they are measured, so a part that times out keeps what it had; each part's log goes to FILE's name
# less .md, plus -logs/.
# --dry-run: every part through the same code on the CPU at tiny sizes (tests/test_gpu_settings.py runs it), the three
# measurement parts in one process (their time limits matter only on the GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python || command -v python3)
OUT=gpu_check.md
DRY=()
TRAIN_DRY=()
MEASURE=(optim loop decode)  # scripts/gpu_check.py's parts, one process each
CARRY=.gpu
WHEELS=(hydra-core==1.3.8 omegaconf==2.3.1 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
        typing-inspection==0.4.2 typing-extensions==4.15.0 submitit==1.5.4 hydra-submitit-launcher==1.2.0)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)
declare -A LIMIT=([tests]=110 [optim]=40 [loop]=90 [decode]=35 [default]=90 [lars]=55)  # 420 s in all
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --dry-run)
      DRY=(--dry-run)
      TRAIN_DRY=(device=cpu data=synthetic data.train_size=512 data.test_size=128 batch=256 max_steps=2 threads=1)
      for k in "${!LIMIT[@]}"; do LIMIT[$k]=240; done
      MEASURE=(optim,loop,decode)
      shift ;;
    --download)
      set -e
      "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]/#/--platform=}" --platform=any --dest "$CARRY/wheels" "${WHEELS[@]}"
      "$PY" -m pip wheel -q --no-deps --wheel-dir "$CARRY/wheels" antlr4-python3-runtime==4.9.3
      mkdir -p "$CARRY/fashion-mnist"
      cp /usr/share/datasets/fashion-mnist/*.gz "$CARRY/fashion-mnist/"
      du -sh "$CARRY"; exit 0 ;;
    *) echo "error: unknown argument $1: use --out FILE, --dry-run or --download" >&2; exit 2 ;;
  esac
done
if ! "$PY" -c "import hydra, omegaconf, pydantic, submitit, pytest" 2>/dev/null; then
  [ -d "$CARRY/wheels" ] || { echo "error: hydra-core etc. are missing and there is no $CARRY/wheels folder: run" \
                          "'bash scripts/gpu_check.sh --download' where there is a network, and carry $CARRY" >&2; exit 1; }
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$CARRY"/wheels/*.whl || exit 1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
DATA=()
[ -d "$CARRY/fashion-mnist" ] && [ ${#TRAIN_DRY[@]} -eq 0 ] && DATA=("data.root=$CARRY/fashion-mnist")
LOGS="${OUT%.md}-logs"
RUNS=$(mktemp -d)  # the runs' folders (a second check must not find the first one's run there)
mkdir -p "$LOGS"
row() { echo "| $1 | $2 | $3 | $4 | $5 |" >> "$OUT"; }
stopped() { row "$1" "stopped (exit $2$([ "$2" -eq 124 ] && echo ': time limit'))" "" "" "${3:-}"; }

{ echo "| part | what | value | unit | note |"; echo "|---|---|---|---|---|"; } > "$OUT"
# the GPU's name from the driver and torch's version from its metadata: importing torch here would cost 1.5 s
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
TORCH=$("$PY" -c "import importlib.metadata as m; print(m.version('torch'))")
row machine "${DEVICE:-CPU}" "" "" "torch $TORCH, $(nproc) CPU cores"
# 1. the cuda-marked tests, four at a time (the compile test alone takes most of a minute)
XDIST=(); [ ${#DRY[@]} -eq 0 ] && "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)
timeout "${LIMIT[tests]}" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" "${XDIST[@]}" -m cuda \
  tests/test_cuda.py > "$LOGS/tests.log" 2>&1
rc=$?
result=$(grep -E "passed|failed|skipped|error" "$LOGS/tests.log" | tail -1)
row "cuda tests" "pytest -m cuda tests/test_cuda.py" "" "" "${result//|//}$([ $rc -eq 124 ] && echo ' (time limit)')"
# 2. gpu_check.py's measurements
for part in "${MEASURE[@]}"; do
  timeout "${LIMIT[${part%%,*}]}" "$PY" scripts/gpu_check.py --part "$part" --out "$OUT" "${DRY[@]}" \
    > "$LOGS/${part//,/+}.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || stopped "$part" $rc "$(tail -1 "$LOGS/${part//,/+}.log" | tr '|' '/')"
done
# 3-4. whole runs of train.py, start to exit: wall time, test accuracy and steady images/s from summary.json
train_run() {
  local name=$1; shift
  local dir="$RUNS/$name" t0 rc
  t0=$(date +%s.%N)
  timeout "${LIMIT[$name]}" "$PY" train.py logger=none "$@" "${DATA[@]}" "${TRAIN_DRY[@]}" "hydra.run.dir=$dir" \
    > "$LOGS/$name.log" 2>&1
  rc=$?
  local wall; wall=$("$PY" -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$t0")
  if [ $rc -ne 0 ]; then stopped "train" $rc "python train.py $*: $(tail -1 "$LOGS/$name.log" | tr '|' '/')"; return; fi
  row "train" "python train.py logger=none $*" "$wall" "s" "$("$PY" -c "import json, sys
s = json.load(open(sys.argv[1]))
print(f\"test acc {s['test_acc']:.4f}, {s['steps']} steps, steady {s['images_per_s']:,.0f} images/s\")" "$dir/summary.json")"
}
train_run default
train_run lars optim=lars batch=32k
cat "$OUT"
