#!/usr/bin/env bash
# The prepared GPU run: every GPU number the docs promise, in under 8 minutes on one CUDA GPU, with
# no network. Writes docs/results/gpu/bench_all.{json,md} (machine named), saving after every
# measurement, so whatever finished is kept. Usage:
#   bash scripts/gpu_bench.sh                     # all sections, --budget-s 420
#   bash scripts/gpu_bench.sh --budget-s 300      # any `visiontools bench all` option
#   bash scripts/gpu_bench.sh --smoke --out /tmp/smoke   # tiny sizes on the CPU: checks the script
# It runs from a checkout without installing it (patches/ and demos/ are put under visiontools), with
# the .venv's Python when there is one, else python3. Packages missing on the GPU machine (diffusers,
# tomesd) can travel as wheels in .whl/ (docs/benchmarks-results.md says how); without them the SD
# section records its error and the others still run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then PY=.venv/bin/python; fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vt-site .whl/*.whl
  export PYTHONPATH="/tmp/vt-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" - "$@" <<'PYCODE'
import pathlib, sys
root = pathlib.Path.cwd()
sys.path.insert(0, str(root))
import visiontools
visiontools.__path__.append(str(root))  # patches/ and demos/ import as visiontools.patches/.demos, as installed
from visiontools.cli import main
args = sys.argv[1:]
sys.exit(main(["bench", "all", *([] if "--smoke" in args or "--device" in args else ["--device", "cuda"]), *args]))
PYCODE
