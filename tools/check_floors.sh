#!/usr/bin/env bash
# Are the dependency floors of pyproject.toml true? Install every direct dependency at the lowest version
# the floors allow (uv's --resolution lowest-direct) into a fresh venv, then run the quick test suite.
#
#   bash tools/check_floors.sh [VENV]        # default VENV: /tmp/uexamples-floors
#
# torch stays at the local CPU build 2.13.0 (older CPU builds are not on this machine's index); numpy and
# pyarrow are pinned to their floors because the lowest-direct resolution would otherwise take newer
# transitive versions (pyarrow >= 21 refuses numpy 1.x at import).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/uexamples-floors}
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0" uv
printf "torch==2.13.0\nnumpy==1.24.4\npyarrow==15.0.0\npillow==10.3.0\n" > "$VENV/floor-constraints.txt"
"$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" --resolution lowest-direct --find-links /opt/wheels \
    -c "$VENV/floor-constraints.txt" -e ".[test]"
"$VENV/bin/uv" pip list --python "$VENV/bin/python" 2>/dev/null | grep -iE \
    "^(torch|datasets|transformers|tokenizers|accelerate|huggingface.hub|safetensors|numpy|pillow|pyarrow|scikit-learn|matplotlib|tqdm) "
OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest tests uexamples --doctest-modules -q -p no:cacheprovider -m "not slow"
