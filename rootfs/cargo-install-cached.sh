#!/usr/bin/env bash
# Installs a crate's binaries from crates.io at a pinned version, once, into a cache
# keyed by a hash of (crate, version, rustc version) under ${MOAT_CACHE:-/var/cache/moat},
# and prints the install root (its binaries are in <root>/bin). Concurrent callers
# wait on a lock and then find the cache filled.
# Usage: cargo-install-cached.sh CRATE VERSION
set -euo pipefail

crate=${1:?usage: cargo-install-cached.sh CRATE VERSION}
version=${2:?usage: cargo-install-cached.sh CRATE VERSION}
cache_root=${MOAT_CACHE:-/var/cache/moat}
key=$( (echo "$crate $version"; rustc --version) | sha256sum | cut -c1-16)
root="$cache_root/$crate/$key"

mkdir -p "$cache_root/$crate"
exec 9>"$cache_root/$crate/.lock"
flock 9
if [ ! -d "$root/bin" ]; then
    echo "cargo-install-cached: installing $crate $version (once; minutes)" >&2
    rm -rf "$root.tmp"
    cargo install --quiet --locked --root "$root.tmp" "$crate@$version" >&2
    rm -rf "$root"
    mv "$root.tmp" "$root"
fi
echo "$root"
