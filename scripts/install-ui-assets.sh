#!/usr/bin/env bash
# Browser assets from the npm registry, pinned by version and checksum, unpacked into
# src/vitalstore/ui/vendor/ (git-ignored: no third-party code in the repository):
#   uPlot           the dashboard's charts (/ui)
#   swagger-ui-dist the interactive API docs (/schema), so they work offline
# `npm pack` fetches the tarball only: no install scripts, no dependencies (swagger-ui-dist's
# one dependency is a telemetry package). Idempotent: a second run sees the stamp and returns.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
    # name version sha256-of-tarball files...
    "uplot 1.6.32 4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d dist/uPlot.iife.min.js dist/uPlot.min.css LICENSE"
    "swagger-ui-dist 5.35.0 1b8e891893404ea4c3558b6a87e2a3e494e7eedba41168c2ece5800a391a6ea6 swagger-ui-bundle.js swagger-ui-standalone-preset.js swagger-ui.css LICENSE NOTICE"
)
dest=src/vitalstore/ui/vendor
stamp="$dest/.installed-$(printf '%s\n' "${PACKAGES[@]}" | sha256sum | cut -c1-16)"

[ -f "$stamp" ] && exit 0
command -v npm >/dev/null || { echo "install-ui-assets: npm is needed (apt-get install npm)" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$dest"
for line in "${PACKAGES[@]}"; do
    read -r name version sha256 files <<<"$line"
    npm pack --silent --pack-destination "$tmp" "$name@$version" >/dev/null
    tarball="$tmp/$name-$version.tgz"
    echo "$sha256  $tarball" | sha256sum --check --quiet
    mkdir -p "$tmp/$name" "$dest/$name"
    # shellcheck disable=SC2086  # the file list is meant to split
    tar -xzf "$tarball" -C "$tmp/$name" $(printf 'package/%s ' $files)
    for file in $files; do cp "$tmp/$name/package/$file" "$dest/$name/$(basename "$file")"; done
    echo "install-ui-assets: $name $version in $dest/$name"
done
touch "$stamp"
