#!/usr/bin/env bash
# Builds the Rust virtiofsd (the virtio-fs backend moat runs per pod) from its crate
# on crates.io, at the version pinned below, once (cargo-install-cached.sh): a second
# run only copies it. It needs libcap-ng-dev and libseccomp-dev (make deps).
# Usage: build-virtiofsd.sh OUT   (OUT: the path of the binary to write)
set -euo pipefail

version=1.14.0
out=${1:?usage: build-virtiofsd.sh OUT}
root=$("$(dirname "$0")/cargo-install-cached.sh" virtiofsd "$version")
mkdir -p "$(dirname "$out")"
cp "$root/bin/virtiofsd" "$out"
