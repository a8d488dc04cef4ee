#!/usr/bin/env bash
# Add dLLM Studio to this user's application menu (no root needed).
#
#     bash packaging/linux/install.sh                       # the pip-installed app (dllm-studio-gui on PATH)
#     bash packaging/linux/install.sh dist/dllm-studio      # a PyInstaller bundle built by packaging/build.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
icons="$here/../../resources/icons"
apps="${XDG_DATA_HOME:-$HOME/.local/share}/applications"
hicolor="${XDG_DATA_HOME:-$HOME/.local/share}/icons/hicolor"
mkdir -p "$apps"
for size in 16 24 32 48 64 128 256 512; do
    mkdir -p "$hicolor/${size}x${size}/apps"
    cp "$icons/dllm-studio-$size.png" "$hicolor/${size}x${size}/apps/dllm-studio.png"
done
mkdir -p "$hicolor/scalable/apps" && cp "$icons/dllm-studio.svg" "$hicolor/scalable/apps/dllm-studio.svg"
if [ $# -ge 1 ]; then  # a bundle: point Exec at its executable
    exe="$(cd "$1" && pwd)/dllm-studio"
    sed "s|^Exec=.*|Exec=\"$exe\"|" "$here/dllm-studio.desktop" > "$apps/dllm-studio.desktop"
else
    cp "$here/dllm-studio.desktop" "$apps/dllm-studio.desktop"
fi
command -v update-desktop-database >/dev/null && update-desktop-database "$apps" || true
echo "installed $apps/dllm-studio.desktop"
