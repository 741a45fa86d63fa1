#!/usr/bin/env bash
# README's first command: install packages, build, run the built-in demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh release
scripts/demo.sh
