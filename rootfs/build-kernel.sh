#!/usr/bin/env bash
# Builds moat's guest kernel from Debian's linux-source-6.1 with the options in
# guest-kernel.config, and caches the result by a hash of (config, source package
# version, this script). A second run with nothing changed only copies the cached
# files. Usage: build-kernel.sh OUTDIR
# Outputs in OUTDIR: vmlinux (ELF with a PVH entry note; what moat boots by default),
# bzImage, and kernel.config (the resolved .config).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-kernel.sh OUTDIR}
cache_root=${MOAT_CACHE:-/var/cache/moat}
src_tar=/usr/src/linux-source-6.1.tar.xz

if [ ! -f "$src_tar" ]; then
    echo "build-kernel: $src_tar is missing; install Debian's linux-source-6.1 (make deps)" >&2
    exit 1
fi
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( (cat "$here/guest-kernel.config" "$0"; echo "$src_version") | sha256sum | cut -c1-16)
cached="$cache_root/kernel/$key"

mkdir -p "$cache_root/kernel"
# One build at a time: a second caller waits here and then finds the cache filled.
exec 9>"$cache_root/kernel/.lock"
flock 9

if [ ! -f "$cached/vmlinux" ]; then
    work=$(mktemp -d "${TMPDIR:-/tmp}/moat-kernel.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    echo "build-kernel: building linux-source $src_version (config $key); this takes a few minutes" >&2
    tar -C "$work" -xf "$src_tar"
    ksrc="$work/linux-source-6.1"
    make -C "$ksrc" -s tinyconfig
    (cd "$ksrc" && ./scripts/kconfig/merge_config.sh -m .config "$here/guest-kernel.config" >/dev/null)
    make -C "$ksrc" -s olddefconfig
    # merge_config only warns when a requested option did not survive; fail instead,
    # since a silently missing option shows up much later as a guest that cannot boot.
    missing=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=n) opt=${line%%=*}
                        if grep -q "^$opt=[ym]" "$ksrc/.config"; then echo "build-kernel: $opt is on but should be off" >&2; missing=1; fi ;;
            CONFIG_*=*) if ! grep -qx "$line" "$ksrc/.config"; then echo "build-kernel: $line did not take effect" >&2; missing=1; fi ;;
        esac
    done < "$here/guest-kernel.config"
    [ "$missing" = 0 ] || exit 1
    make -C "$ksrc" -s -j"$(nproc)" vmlinux bzImage
    mkdir -p "$cached.tmp"
    cp "$ksrc/vmlinux" "$cached.tmp/vmlinux"
    cp "$ksrc/arch/x86/boot/bzImage" "$cached.tmp/bzImage"
    cp "$ksrc/.config" "$cached.tmp/kernel.config"
    strip --strip-debug "$cached.tmp/vmlinux" 2>/dev/null || true
    rm -rf "$cached"
    mv "$cached.tmp" "$cached"
fi

mkdir -p "$out"
cp "$cached/vmlinux" "$cached/bzImage" "$cached/kernel.config" "$out/"
echo "build-kernel: $out/vmlinux (config $key)" >&2
