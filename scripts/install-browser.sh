#!/usr/bin/env bash
# Debian's Chromium for the browser tests (Playwright drives it; its own browser download
# cannot work offline). Idempotent: returns at once when /usr/bin/chromium is there.
set -euo pipefail
[ -x /usr/bin/chromium ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "install-browser: run as root, or: sudo apt-get install -y chromium" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends chromium
