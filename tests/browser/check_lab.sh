#!/usr/bin/env bash
# Open nbs/25_explore.ipynb in JupyterLab with headless Chromium, run all cells, use the explorer, save screenshots.
#   tests/browser/check_lab.sh [OUT_DIR]        (default OUT_DIR: _proc/_lab)
# Needs chromium (Debian: apt-get install -y chromium); exits 77 (skipped) without it. Set SPEEDER_EXPLORE_RUNS to
# explore trained runs instead of the two tiny stand-in runs the notebook builds.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-_proc/_lab}"
exec python tests/browser/lab_check.py --out "$out" "${@:2}"
