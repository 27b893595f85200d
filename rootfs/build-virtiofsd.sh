#!/usr/bin/env bash
# Builds the Rust virtiofsd (the virtio-fs backend moat runs per pod) from its crate
# on crates.io, at the version pinned below, and caches the binary by a hash of
# (version, rustc version, this script): a second run only copies it. It needs
# libcap-ng-dev and libseccomp-dev (make deps). Usage: build-virtiofsd.sh OUT
# OUT: the path of the binary to write.
set -euo pipefail

version=1.14.0
out=${1:?usage: build-virtiofsd.sh OUT}
cache_root=${MOAT_CACHE:-/var/cache/moat}
key=$( (cat "$0"; rustc --version) | sha256sum | cut -c1-16)
cached="$cache_root/virtiofsd/$key"

mkdir -p "$cache_root/virtiofsd"
exec 9>"$cache_root/virtiofsd/.lock"
flock 9
if [ ! -x "$cached/bin/virtiofsd" ]; then
    echo "build-virtiofsd: building virtiofsd $version (a few minutes, once)" >&2
    rm -rf "$cached.tmp"
    cargo install --quiet --locked --root "$cached.tmp" "virtiofsd@$version"
    rm -rf "$cached"
    mv "$cached.tmp" "$cached"
fi
mkdir -p "$(dirname "$out")"
cp "$cached/bin/virtiofsd" "$out"
