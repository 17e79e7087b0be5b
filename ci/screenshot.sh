#!/usr/bin/env bash
# Render an HTML report in headless Chromium (Debian's `chromium` package) and save a PNG of it.
#
# Usage: ci/screenshot.sh REPORT.html OUT.png [WIDTH,HEIGHT]     (default 1200,1600)
# Also prints the DOM as the browser parsed it, so callers can check what was rendered.
# The flags keep Chromium off the network: the report must be self-contained to render fully.
set -euo pipefail
html="$(realpath "$1")" png="$2" size="${3:-1200,1600}"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking
       --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile")
chromium "${flags[@]}" --window-size="$size" --screenshot="$png" "file://$html" 2>/dev/null
chromium "${flags[@]}" --dump-dom "file://$html" 2>/dev/null
