#!/usr/bin/env bash
# Screenshot every rendered report (reports/*.html) with headless Chromium at the widths a reader uses, to check by
# eye: legible axes and labels at 1024 px, no overlapping labels, tables that fit, the verdict and Table 1 on top.
#
# Usage:  scripts/screenshot_reports.sh [REPORTS_DIR] [OUT_DIR] [WIDTH ...]
#         defaults: reports/  reports/screenshots/  1400 1024;  HEIGHT=6000 (pixels captured from the top)
# Needs:  Debian's chromium (apt-get update && apt-get install -y chromium). The test suite's browser check
#         (tests/report/test_browser.py) is the automatic counterpart; this script is for people.
# Output: OUT_DIR/<report>-<width>.png
#
# Chromium runs fully offline: no sandbox (root in a container), no GPU, every host name unresolvable, no
# background networking, component updates, sync or QUIC, and a throw-away profile directory removed afterwards.
set -euo pipefail

reports_dir=${1:-reports}
out_dir=${2:-$reports_dir/screenshots}
shift $(( $# > 2 ? 2 : $# ))
widths=("${@:-1400 1024}")
read -r -a widths <<< "${widths[*]}"
height=${HEIGHT:-6000}
browser=$(command -v chromium || command -v chromium-browser || true)
if [[ -z "$browser" ]]; then
    echo "error: chromium not found; install it with: apt-get update && apt-get install -y chromium" >&2
    exit 2
fi
shopt -s nullglob
pages=("$reports_dir"/*.html)
if (( ${#pages[@]} == 0 )); then
    echo "error: no HTML report in $reports_dir; render them first (make repro, or dvc repro index)" >&2
    exit 2
fi
mkdir -p "$out_dir"
profile_dir=$(mktemp -d)
trap 'rm -rf "$profile_dir"' EXIT

for page in "${pages[@]}"; do
    name=$(basename "$page" .html)
    for width in "${widths[@]}"; do
        target="$(cd "$out_dir" && pwd)/$name-$width.png"
        "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
            --disable-background-networking --disable-component-update --disable-sync \
            --host-resolver-rules="MAP * ~NOTFOUND" --hide-scrollbars --user-data-dir="$profile_dir" \
            --window-size="$width,$height" --screenshot="$target" "file://$(cd "$(dirname "$page")" && pwd)/$name.html" \
            > /dev/null 2>&1 || { echo "error: chromium failed on $page" >&2; exit 1; }
        echo "screenshot $target"
    done
done
