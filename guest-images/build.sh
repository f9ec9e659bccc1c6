#!/bin/bash
# Builds the guest images the tests and benchmarks boot, into guest-images/out/:
#   stock/vmlinuz, stock/modules/  Debian's stock kernel (fetch-stock-kernel.sh)
#   minimal/bzImage                linux-source-6.1: tinyconfig + minimal.config
#   initramfs.cpio.gz              busybox, ./init, the stock kernel's NIC modules
#
# Usage: guest-images/build.sh [all|stock|minimal|initramfs]   (default: all)
#
# Cached: each output has a stamp holding a hash of its inputs; a rerun with
# unchanged inputs does nothing. A changed fragment rebuilds the kernel
# incrementally in out/minimal/src. `initramfs` also fetches the stock kernel,
# whose modules it carries.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out="$here/out"
self="$here/$(basename "$0")"
fragment="$here/minimal.config"
init_script="$here/init"
linux_pkg=linux-source-6.1
linux_tarball=/usr/src/linux-source-6.1.tar.xz
# Loaded by /init, in this order, when it runs on the stock kernel.
stock_modules=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev
               virtio_pci failover net_failover virtio_net e1000)

log() { echo "build.sh: $*"; }
die() { echo "build.sh: error: $*" >&2; exit 1; }

usage() {
    sed -n '2,12s/^# \{0,1\}//p' "$self"
}

target=${1:-all}
case "$target" in
    all | stock | minimal | initramfs) ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac
[ $# -le 1 ] || { usage >&2; exit 2; }

# --- prerequisites -----------------------------------------------------------

pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}
pkg_version() { dpkg-query -W -f='${Version}' "$1"; }

require_packages() {
    local missing=() p
    for p in "$@"; do
        pkg_installed "$p" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        die "missing Debian packages: ${missing[*]}; install them with: apt-get install ${missing[*]} (or run scripts/install-deps)"
    fi
}

case "$target" in
    stock) need=() ;;
    minimal) need=("$linux_pkg" bc flex bison libelf-dev libssl-dev make gcc xz-utils) ;;
    initramfs) need=(busybox-static cpio gzip xz-utils ethtool iperf3) ;;
    all) need=("$linux_pkg" bc flex bison libelf-dev libssl-dev make gcc xz-utils
               busybox-static cpio gzip ethtool iperf3) ;;
esac
[ ${#need[@]} -eq 0 ] || require_packages "${need[@]}"

mkdir -p "$out"
# One build at a time (tests may start several).
exec 9>"$out/.build.lock"
flock 9

# --- helpers -----------------------------------------------------------------

# hash_inputs LINE...: one hash over the given lines (file hashes, versions).
hash_inputs() { printf '%s\n' "$@" | sha256sum | cut -d' ' -f1; }
file_hash() { sha256sum "$1" | cut -d' ' -f1; }

# stamp_ok STAMP HASH OUTPUT: the output exists and was built from HASH.
stamp_ok() {
    [ -f "$1" ] && [ -e "$3" ] && [ "$(cat "$1")" = "$2" ]
}

elapsed() {
    local s=$(($(date +%s) - $1))
    printf '%dm%02ds' $((s / 60)) $((s % 60))
}

# run_logged LOGFILE CMD...: run quietly; on failure show the log's tail.
run_logged() {
    local logfile=$1
    shift
    echo "+ $*" >>"$logfile"
    if ! "$@" >>"$logfile" 2>&1; then
        echo "build.sh: failed: $* (last lines of $logfile follow)" >&2
        tail -n 40 "$logfile" >&2
        exit 1
    fi
}

cached=()   # outputs that were up to date
built=()    # outputs that were (re)built

# --- stock kernel --------------------------------------------------------------

stock_version=""
build_stock() {
    local before after
    before=$(stat -c '%Y %s' "$out/stock/vmlinuz" "$out/stock/version" 2>/dev/null || true)
    "$here/fetch-stock-kernel.sh"
    after=$(stat -c '%Y %s' "$out/stock/vmlinuz" "$out/stock/version" 2>/dev/null || true)
    stock_version=$(cat "$out/stock/version")
    [ -d "$out/stock/modules" ] || die "fetch-stock-kernel.sh left no $out/stock/modules"
    if [ -n "$before" ] && [ "$before" = "$after" ]; then
        cached+=("stock ($stock_version)")
    else
        built+=("stock ($stock_version)")
    fi
}

# --- minimal kernel ------------------------------------------------------------

build_minimal() {
    local dir="$out/minimal" src="$out/minimal/src" stamp="$out/minimal/bzImage.stamp"
    local logfile="$out/minimal/build.log" srcver hash t0
    srcver=$(pkg_version "$linux_pkg")
    hash=$(hash_inputs "script $(file_hash "$self")" "fragment $(file_hash "$fragment")" \
        "$linux_pkg $srcver" "gcc $(gcc -dumpfullversion)")
    if stamp_ok "$stamp" "$hash" "$dir/bzImage"; then
        cached+=("minimal")
        return
    fi
    t0=$(date +%s)
    mkdir -p "$dir"
    rm -f "$stamp"
    : >"$logfile"
    [ -f "$linux_tarball" ] || die "$linux_tarball not found (package $linux_pkg $srcver)"

    # The source tree, extracted once per linux-source version.
    if [ ! -f "$src/.rvm-source-version" ] || [ "$(cat "$src/.rvm-source-version")" != "$srcver" ]; then
        log "minimal: extracting $linux_tarball"
        rm -rf "$src" "$dir/src.tmp"
        mkdir -p "$dir/src.tmp"
        tar -xf "$linux_tarball" -C "$dir/src.tmp"
        mv "$dir/src.tmp/linux-source-6.1" "$src"
        rmdir "$dir/src.tmp"
        echo "$srcver" >"$src/.rvm-source-version"
    fi

    log "minimal: configuring and building (log: $logfile)"
    local mk=(make -C "$src" KBUILD_BUILD_USER=rvm KBUILD_BUILD_HOST=rvm)
    run_logged "$logfile" "${mk[@]}" tinyconfig
    run_logged "$logfile" env -C "$src" scripts/kconfig/merge_config.sh -m .config "$fragment"
    run_logged "$logfile" "${mk[@]}" olddefconfig

    # merge_config.sh silently drops symbols whose dependencies are unmet:
    # every CONFIG_X=y of the fragment must be in .config, every
    # "# CONFIG_X is not set" must not be enabled.
    local lost=() line sym
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=y)
                grep -qxF "$line" "$src/.config" || lost+=("${line%%=*}")
                ;;
            "# CONFIG_"*" is not set")
                sym=${line#"# "}
                sym=${sym%" is not set"}
                if grep -qE "^$sym=[ym]$" "$src/.config"; then lost+=("$sym (should be off)"); fi
                ;;
        esac
    done <"$fragment"
    if [ ${#lost[@]} -gt 0 ]; then
        echo "build.sh: error: minimal.config options that did not survive olddefconfig (unmet dependencies?):" >&2
        printf '  %s\n' "${lost[@]}" >&2
        exit 1
    fi

    run_logged "$logfile" "${mk[@]}" -j"$(nproc)" bzImage
    cp "$src/arch/x86/boot/bzImage" "$dir/bzImage.tmp"
    mv "$dir/bzImage.tmp" "$dir/bzImage"
    cp "$src/.config" "$dir/config"
    echo "$hash" >"$stamp"
    built+=("minimal ($(du -h "$dir/bzImage" | cut -f1), $(elapsed "$t0"))")
}

# --- initramfs -----------------------------------------------------------------

udhcpc_script="$here/udhcpc.script"

# copy_binary ROOT NAME: the host's NAME and every library ldd lists for it
# (the dynamic loader included), at the same paths under ROOT. Libraries are
# 0755: the kernel refuses to map an ELF interpreter that is not executable.
copy_binary() {
    local root=$1 path lib
    path=$(command -v "$2") || die "$2 is not installed (scripts/install-deps installs it)"
    path=$(readlink -f "$path")
    install -D -m 0755 "$path" "$root/usr/bin/$2"
    for lib in $(ldd "$path" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
        [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done
}

build_initramfs() {
    local img="$out/initramfs.cpio.gz" stamp="$out/initramfs.cpio.gz.stamp" hash
    hash=$(hash_inputs "script $(file_hash "$self")" "init $(file_hash "$init_script")" \
        "busybox-static $(pkg_version busybox-static)" "busybox $(file_hash /bin/busybox)" \
        "stock $stock_version" "ethtool $(pkg_version ethtool)" "iperf3 $(pkg_version iperf3)" \
        "udhcpc $(file_hash "$udhcpc_script")")
    if stamp_ok "$stamp" "$hash" "$img"; then
        cached+=("initramfs")
        return
    fi
    rm -f "$stamp"
    local root
    root=$(mktemp -d "$out/initramfs.XXXXXX")
    # shellcheck disable=SC2064  # expand $root now
    trap "rm -rf '$root'" EXIT

    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,root}
    chmod 1777 "$root/tmp"
    cp /bin/busybox "$root/bin/busybox"
    local applet
    while IFS= read -r applet; do
        case "$applet" in
            bin/busybox | linuxrc | "") continue ;;
        esac
        [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
    done < <(/bin/busybox --list-full)
    install -m 0755 "$init_script" "$root/init"
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\n' >"$root/etc/group"

    # The stock kernel's NIC drivers, flat in /lib/modules/<version>/.
    local moddir="$root/lib/modules/$stock_version" m f
    mkdir -p "$moddir"
    for m in "${stock_modules[@]}"; do
        f=$(find "$out/stock/modules/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" \) -print -quit)
        [ -n "$f" ] || die "stock module $m not found under $out/stock/modules/kernel"
        case "$f" in
            *.xz) xz -dc "$f" >"$moddir/$m.ko" ;;
            *) cp "$f" "$moddir/$m.ko" ;;
        esac
    done

    # Host tools the network scenarios use: the offloads the guest sees
    # (ethtool -k) and throughput (iperf3), with their shared libraries.
    local bin
    for bin in ethtool iperf3; do
        copy_binary "$root" "$bin"
    done
    install -D -m 0755 "$udhcpc_script" "$root/usr/share/udhcpc/default.script"

    # Reproducible archive: sorted names, root-owned, fixed mtimes.
    find "$root" -exec touch -h -d @0 {} +
    (cd "$root" && find . -mindepth 1 -printf '%P\0' | LC_ALL=C sort -z |
        cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
        gzip -9 -n >"$img.tmp"
    mv "$img.tmp" "$img"
    rm -rf "$root"
    trap - EXIT
    echo "$hash" >"$stamp"
    built+=("initramfs ($(du -h "$img" | cut -f1))")
}

# --- main ----------------------------------------------------------------------

case "$target" in
    stock) build_stock ;;
    minimal) build_minimal ;;
    initramfs) build_stock; build_initramfs ;;
    all) build_stock; build_minimal; build_initramfs ;;
esac

join() { printf '%s' "$1"; shift; [ $# -eq 0 ] || printf '; %s' "$@"; }
if [ ${#built[@]} -eq 0 ]; then
    log "cached, nothing to do: $(join "${cached[@]}")"
else
    log "built: $(join "${built[@]}")${cached[*]:+ (cached: $(join "${cached[@]}"))}"
fi
