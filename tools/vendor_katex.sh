#!/usr/bin/env bash
# Refresh the copy of KaTeX that the book ships, so that its math renders offline.
#
# A maintainer's tool, never run by `make book`: it needs npm (only to fetch the published
# package). It keeps what the site loads and nothing else: the minified library, the
# auto-render extension, the stylesheet, the woff2 fonts (every browser the book targets
# reads woff2; the stylesheet's woff/ttf fallbacks are never requested) and the licence.
#
#   tools/vendor_katex.sh            # the version below
#   tools/vendor_katex.sh 0.19.2     # another version
set -euo pipefail
version="${1:-0.19.1}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/book/javascripts/vendor/katex"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "katex@$version" >/dev/null)
tarball="$(ls "$work"/katex-*.tgz)"
tar -xzf "$tarball" -C "$work"
package="$work/package"

rm -rf "$dest"
mkdir -p "$dest/contrib" "$dest/fonts"
cp "$package/dist/katex.min.js" "$package/dist/katex.min.css" "$dest/"
cp "$package/dist/contrib/auto-render.min.js" "$dest/contrib/"
cp "$package"/dist/fonts/*.woff2 "$dest/fonts/"
cp "$package/LICENSE" "$dest/LICENSE"
cat > "$dest/SOURCE.txt" <<EOF
KaTeX $version (MIT licence, see LICENSE), from the npm registry:
  npm pack katex@$version
  sha256 $(sha256sum "$tarball" | cut -d' ' -f1)  $(basename "$tarball")
Kept: dist/katex.min.js, dist/katex.min.css, dist/contrib/auto-render.min.js,
dist/fonts/*.woff2, LICENSE. Refresh with tools/vendor_katex.sh.
EOF
du -sh "$dest"
