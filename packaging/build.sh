#!/usr/bin/env bash
# Build the one-folder desktop bundle into dist/dllm-studio and check it with --smoke.
#
#     bash packaging/build.sh            # from the repository root, with .venv set up by the README
#
# Prints the build time and the bundle size recorded in packaging/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip install --quiet "pyinstaller==6.22.3" "pyinstaller-hooks-contrib>=2026.9"
start=$(date +%s)
"$PY" -m PyInstaller --noconfirm --clean --log-level WARN --distpath dist --workpath build/pyinstaller \
    packaging/dllm_studio.spec
echo "build: $(( $(date +%s) - start )) s, bundle: $(du -sh dist/dllm-studio | cut -f1)"
# The check runs with an empty environment, as a double-click would: nothing from this shell or venv.
env -i HOME="$(mktemp -d)" QT_QPA_PLATFORM=offscreen dist/dllm-studio/dllm-studio --smoke dist/smoke.png
