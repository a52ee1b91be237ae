#!/usr/bin/env bash
# The GPU check, one command, about 5 minutes on one H100/H200, each part under its own time limit:
#   bash scripts/gpu_check.sh [--out FILE] [--dry-run]        (default FILE: gpu_check.md)
#   bash scripts/gpu_check.sh --download                       (here, with a network: fill wheels/ first)
# A lent GPU machine has torch and torchvision but no network and none of hydra-core, omegaconf, pydantic, submitit,
# pytest: their wheels (antlr4 4.9 as its source: it has no wheel; 5.6 MB in all) travel in wheels/ (git-ignored,
# downloaded here for this Python) and are installed there with pip --no-index. wandb is not needed: every part
# runs with logger=none. The table (scripts/gpu_check.py's rows, then the cuda-marked tests) is written to FILE row
# by row, so a part that times out keeps what it measured.
# --dry-run: every part through the same code on the CPU at tiny sizes (tests/test_gpu_settings.py runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=gpu_check.md
DRY=()
LIMIT=120
WHEELS=(hydra-core==1.3.8 omegaconf==2.3.1 pydantic==2.13.4 submitit==1.5.4 hydra-submitit-launcher==1.2.0
        tqdm==4.70.1 pytest==9.0.3)
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --dry-run) DRY=(--dry-run); LIMIT=240; shift ;;
    --download)
      python -m pip download -q --prefer-binary --dest wheels "${WHEELS[@]}" && du -sh wheels; exit $? ;;
    *) echo "error: unknown argument $1: use --out FILE, --dry-run or --download" >&2; exit 2 ;;
  esac
done
if ! python -c "import hydra, omegaconf, pydantic, submitit, pytest" 2>/dev/null; then
  [ -d wheels ] || { echo "error: hydra-core etc. are missing and there is no wheels/ folder: run" \
                          "'bash scripts/gpu_check.sh --download' where there is a network, and carry wheels/" >&2; exit 1; }
  python -m pip install -q --no-index --find-links wheels "${WHEELS[@]}" || exit 1
fi
{ echo "| part | what | value | unit | note |"; echo "|---|---|---|---|---|"; } > "$OUT"
for part in optim loop decode; do
  timeout "$LIMIT" python scripts/gpu_check.py --part "$part" --out "$OUT" "${DRY[@]}"
  rc=$?
  [ $rc -eq 0 ] || echo "| $part | stopped (exit $rc$([ $rc -eq 124 ] && echo ': time limit')) | | | |" >> "$OUT"
done
result=$(timeout "$LIMIT" python -m pytest -q -p no:cacheprovider -o addopts="" -m cuda tests/test_cuda.py 2>&1 | tail -1)
echo "| cuda tests | pytest -m cuda tests/test_cuda.py | | | ${result//|//} |" >> "$OUT"
cat "$OUT"
