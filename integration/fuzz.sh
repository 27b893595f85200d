#!/usr/bin/env bash
# Builds every cargo-fuzz target of moat (vmm/fuzz, shim/fuzz) and runs each for a
# bounded time from its committed seeds; any crash, failed check, hang
# (-timeout) or build failure fails the run. `make test-fuzz` runs it.
#
# cargo-fuzz is installed from crates.io at the version pinned below and cached
# (rootfs/cargo-install-cached.sh) under ${MOAT_CACHE:-/var/cache/moat}, as is the
# fuzz targets' build directory, so a second run rebuilds only moat's own
# crates. Only the stable toolchain is needed: RUSTC_BOOTSTRAP lets it take the -Z
# flags libFuzzer's instrumentation uses.
#
# Usage: fuzz.sh [TARGET...]   (default: all)
# Environment: MOAT_FUZZ_SECONDS (per target, default 20), MOAT_CACHE.
# Grown corpora go to build/fuzz/corpus/<target>, crash inputs to
# build/fuzz/artifacts/<target>/ (neither is committed).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

version=0.13.2
secs=${MOAT_FUZZ_SECONDS:-20}
cache_root=${MOAT_CACHE:-/var/cache/moat}
out="$root/build/fuzz"
started=$(date +%s)

tool=$(rootfs/cargo-install-cached.sh cargo-fuzz "$version")
export PATH="$tool/bin:$PATH"
export RUSTC_BOOTSTRAP=1
# Optimized, with debug assertions and overflow checks, under AddressSanitizer
# (cargo-fuzz's defaults plus -a); 16 codegen units build faster on few cores.
build_flags=(--release --debug-assertions --codegen-units 16)

wanted=("$@")
failed=()
for crate in vmm shim; do
    target_dir="$cache_root/fuzz-target/$crate"
    t0=$(date +%s)
    # The lock file must already say everything: builds are reproducible offline.
    cargo fetch --locked --quiet --manifest-path "$crate/fuzz/Cargo.toml"
    (cd "$crate" && cargo fuzz build "${build_flags[@]}" --target-dir "$target_dir")
    echo "fuzz: built $crate/fuzz in $(( $(date +%s) - t0 )) s"
    for t in $(cd "$crate" && cargo fuzz list); do
        if [ ${#wanted[@]} -gt 0 ] && ! printf '%s\n' "${wanted[@]}" | grep -qx "$t"; then
            continue
        fi
        mkdir -p "$out/corpus/$t" "$out/artifacts/$t"
        echo "=== fuzz $t (${secs} s)"
        # -timeout: one input taking 30 s is a hang. (ttrpc skips a frame that claims up to
        # 4 GiB 4 KiB at a time even after EOF: seconds under AddressSanitizer.)
        if ! (cd "$crate" && cargo fuzz run "${build_flags[@]}" --target-dir "$target_dir" "$t" \
                "$out/corpus/$t" "$root/$crate/fuzz/seeds/$t" -- \
                -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
                -artifact_prefix="$out/artifacts/$t/" 2>&1 | grep -vE '^#[0-9]|NEW_FUNC|^"|ecommended dictionary'); then
            failed+=("$t")
            echo "*** fuzz $t FAILED; inputs in build/fuzz/artifacts/$t/ (reproduce: cd $crate && cargo fuzz run $t <input>)"
        fi
    done
done
echo "fuzz: done in $(( $(date +%s) - started )) s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}" >&2
    exit 1
fi
