#!/usr/bin/env bash
# Create benchmarks/.venv-py4dstem: py4DSTEM 0.14.18 (+ pyxem 0.21 when it installs beside it), from PyPI only.
#
# py4DSTEM 0.14.18 pins numpy 1.26 and scikit-learn 1.4, which clash with stemml's own environment
# (numpy 2.x), so the peer tools live in this separate virtual environment; benchmarks/strain_vs_py4dstem.py
# calls them as subprocesses (benchmarks/py4dstem_runner.py, benchmarks/pyxem_runner.py).
#
# Usage:  bash benchmarks/py4dstem_env.sh            (PYTHON=python3.11 by default; VENV overrides the path)
#         bash benchmarks/py4dstem_env.sh --no-pyxem
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$HERE/.venv-py4dstem}"
PYTHON="${PYTHON:-python3.11}"
WITH_PYXEM=1
[[ "${1:-}" == "--no-pyxem" ]] && WITH_PYXEM=0

"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install "py4dstem==0.14.18"
if [[ $WITH_PYXEM == 1 ]]; then
  # pyxem 0.21 must not move py4DSTEM's pins; if pip cannot satisfy both, skip it (the benchmark then says so).
  if ! "$VENV/bin/python" -m pip install "pyxem==0.21.*" -c <("$VENV/bin/python" -m pip freeze | grep -iE '^(numpy|scikit-learn|scipy)=='); then
    echo "pyxem 0.21 does not install beside py4dstem 0.14.18 with its pins; continuing without it" >&2
  fi
fi
"$VENV/bin/python" -m pip check || true
"$VENV/bin/python" -c "import py4DSTEM; print('py4DSTEM', py4DSTEM.__version__)"
"$VENV/bin/python" -c "import pyxem; print('pyxem', pyxem.__version__)" 2>/dev/null || echo "pyxem: not installed"
