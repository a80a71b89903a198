#!/usr/bin/env bash
# Installs the Debian packages fluxq builds against, if any is missing.
# The CUDA toolkit is expected at /usr/local/cuda (optional: without it the
# build is CPU-only).
set -euo pipefail
pkgs=(build-essential pkg-config xz-utils libcjson-dev libopenblas-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "fluxq: installing Debian packages: ${missing[*]}" >&2
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
