#!/usr/bin/env bash
# The documented install, from a built wheel in a fresh venv outside the clone, then `mfv demo`
# in an empty folder (issue #34). Usage: .ci/installed.sh [extra demo options]
#   MFV_TORCH_INDEX  the index torch comes from (default: PyTorch's CPU index, as the README
#                    says; empty: pip's configured sources, e.g. a local wheel folder offline)
#   MFV_WORK         a folder for the wheel, the venv and the demo's folder (default: a new temp one)
# Prints the wheel's size and each step's time; exits non-zero unless the demo wrote its report.
set -euo pipefail
clone="$(cd "$(dirname "$0")/.." && pwd)"
work="${MFV_WORK:-$(mktemp -d)}"
index="${MFV_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
python="${PYTHON:-python3}"
torch_version="$(sed -n 's/^torch==//p' "$clone/constraints.txt")"
step() { echo "== $1 ($(( SECONDS - started )) s so far)"; }
started=$SECONDS

step "wheel"
# Built from a copy: setuptools writes build/ into the tree it builds.
mkdir -p "$work/src"
tar -C "$clone" --exclude=./.venv --exclude=./.git --exclude=./runs --exclude=./data --exclude=./build \
  --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$work/src" -xf -
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$work/src"
wheel="$(ls "$work"/dist/mfv-*.whl)"
du -h "$wheel"

step "fresh venv: torch $torch_version (CPU build), then the wheel with the pinned constraints"
"$python" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip install --quiet)
if [ -n "$index" ]; then
  "${pip[@]}" --index-url "$index" "torch==$torch_version"
else
  "${pip[@]}" "torch==$torch_version"
fi
"${pip[@]}" "$wheel" -c "$clone/constraints.txt"
"${pip[@]}" --no-deps -c "$clone/constraints.txt" open-flamingo==2.0.1
if "$work/venv/bin/python" -m pip freeze | grep -i '^nvidia-'; then
  echo "CUDA packages were installed into the CPU venv" >&2
  exit 1
fi

step "mfv demo in an empty folder"
mkdir -p "$work/empty"
cd "$work/empty"
"$work/venv/bin/mfv" demo --out X "$@"
test -s X/eval/report.md
test -s X/eval/metrics.json
step "done: $work/empty/X/eval/report.md"
