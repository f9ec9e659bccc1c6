#!/bin/bash
# Unpack (never install) Debian's stock kernel, the image behind
# linux-image-amd64, into guest-images/out/stock/:
#   vmlinuz      the bzImage
#   modules/     lib/modules/<version> as shipped (plain .ko files)
#   version      the kernel version string (e.g. 6.1.0-56-amd64)
# Cached: a rerun with the same package version does nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/out/stock"
mkdir -p "$out"

# The exact package name: `apt-get download` must not be given a glob.
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
    echo "fetch-stock-kernel: cannot resolve linux-image-amd64; run 'apt-get update' first" >&2
    exit 1
fi
ver=${pkg#linux-image-}
if [ -f "$out/version" ] && [ "$(cat "$out/version")" = "$ver" ] && [ -f "$out/vmlinuz" ]; then
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq "$pkg")
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/root"
rm -rf "$out/modules" "$out/vmlinuz"
cp "$work/root/boot/vmlinuz-$ver" "$out/vmlinuz"
mv "$work/root/lib/modules/$ver" "$out/modules"
echo "$ver" > "$out/version"
echo "fetch-stock-kernel: $pkg unpacked into $out"
