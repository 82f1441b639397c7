#!/usr/bin/env bash
# Set up visiontools in ./.venv: `bash scripts/setup.sh` (the library with everything the demo and
# the README's features use: Gradio, diffusers for Stable Diffusion, tomesd for `bench sd`, ONNX for
# `visiontools export`) or
# `bash scripts/setup.sh --dev` (the same plus test tools and Chromium for the browser test).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="demo,sd,bench,export"
if [[ "${1:-}" == "--dev" ]]; then extras="dev"; fi

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# patches/ and demos/ install as visiontools.patches and visiontools.demos (package-dir mapping), for
# which setuptools' editable install prints a generic notice about same-named folders: silenced here
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install -q -e ".[${extras}]"

if [[ "$extras" == "dev" && ! -x /usr/bin/chromium ]]; then
  # the end-to-end demo test drives Debian's Chromium with Playwright (no browser download)
  if [[ "$(id -u)" == "0" ]]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the browser test will fail" >&2
  else
    echo "warning: install Chromium (/usr/bin/chromium) for the browser test" >&2
  fi
fi
echo "visiontools is set up in .venv (extras: ${extras}); activate it with: source .venv/bin/activate"
