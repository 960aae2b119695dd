#!/usr/bin/env bash
# Screenshot every rendered report (reports/*.html) with headless Chromium, to check by eye what a reader sees:
# readable axes, units, labels that do not overlap, tables that fit, the synthetic-profile banner.
#
# Usage:  scripts/screenshot_reports.sh [REPORTS_DIR] [OUT_DIR] [WIDTHxHEIGHT]
#         defaults: reports/  reports/screenshots/  1280x2000
# Needs:  Debian's chromium (apt-get update && apt-get install -y chromium). Not needed by the test suite.
# Output: OUT_DIR/<report>.png, one per HTML file (the top WIDTHxHEIGHT pixels of the page).
#
# Chromium runs fully offline: no sandbox (we run as root in a container), no GPU, no background networking,
# component updates, sync or QUIC, and a throw-away profile directory that is removed afterwards.
set -euo pipefail

reports_dir=${1:-reports}
out_dir=${2:-$reports_dir/screenshots}
size=${3:-1280x2000}
browser=$(command -v chromium || command -v chromium-browser || true)
if [[ -z "$browser" ]]; then
    echo "error: chromium not found; install it with: apt-get update && apt-get install -y chromium" >&2
    exit 2
fi
shopt -s nullglob
pages=("$reports_dir"/*.html)
if (( ${#pages[@]} == 0 )); then
    echo "error: no HTML report in $reports_dir; render them first (dvc repro, or the report stage)" >&2
    exit 2
fi
mkdir -p "$out_dir"
profile_dir=$(mktemp -d)
trap 'rm -rf "$profile_dir"' EXIT

for page in "${pages[@]}"; do
    name=$(basename "$page" .html)
    target="$(cd "$out_dir" && pwd)/$name.png"
    "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --hide-scrollbars --user-data-dir="$profile_dir" \
        --window-size="${size/x/,}" --screenshot="$target" "file://$(cd "$(dirname "$page")" && pwd)/$name.html" \
        > /dev/null 2>&1 || { echo "error: chromium failed on $page" >&2; exit 1; }
    echo "screenshot $target"
done
