//! Helpers for moat's end-to-end tests. The tests themselves are in `tests/`; those
//! that boot Linux need a KVM that can, so `make test-kvm` runs them through
//! `integration/testhost` (natively on hardware KVM, in the emulated host on PVM).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

/// True where /dev/kvm can boot an unmodified Linux guest: it exists and is not PVM.
pub fn kvm_boots_linux() -> bool {
    Path::new("/dev/kvm").exists() && !Path::new("/sys/module/kvm_pvm").exists()
}

/// Finds one of moat's files: under `MOAT_PREFIX` if that is set; else the freshest
/// build of this checkout (cargo's `target/debug`, then `build/`); else where
/// `make install` puts it by default (/usr/local).
/// `name` is a binary (`moat-vmm`, `moat`, `virtiofsd`: `make build` puts the last in
/// `build/bin`, `make install` in `libexec/moat`) or a guest artifact (`vmlinux`,
/// `bzImage`, `initramfs.cpio.gz`).
pub fn artifact(name: &str) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let prefix = std::env::var_os("MOAT_PREFIX").map(PathBuf::from);
    let (subdir, local) = if name == "moat-vmm" || name == "moat" {
        ("bin", vec![repo.join("target/debug"), repo.join("build/bin")])
    } else if name == "virtiofsd" {
        ("libexec/moat", vec![repo.join("build/bin")])
    } else {
        ("share/moat", vec![repo.join("build/guest")])
    };
    let mut candidates: Vec<PathBuf> = Vec::new();
    if prefix.is_none() {
        candidates.extend(local.iter().map(|d| d.join(name)));
    }
    candidates.push(prefix.unwrap_or_else(|| "/usr/local".into()).join(subdir).join(name));
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| panic!("{name} not found (looked in {candidates:?}); run `make install` or `make guest`"))
}

/// The static `moat-vsock-probe` (`make build` puts it in build/bin), which tests run
/// inside containers to see which vsock addresses they reach.
pub fn vsock_probe() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates =
        [repo.join("build/bin/moat-vsock-probe"), repo.join("target/x86_64-unknown-linux-gnu/release/moat-vsock-probe")];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| panic!("moat-vsock-probe not found (looked in {candidates:?}); run `make build`"))
}

/// One of the test images `make images` builds from busybox-static (integration/mkimage.py):
/// `busybox-oci` (OCI layout), `busybox.tar` (docker-save) or `busybox-rootfs`.
pub fn test_image(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/images").join(name);
    assert!(p.exists(), "test image {} is missing; run `make images`", p.display());
    p
}

/// Fails (never skips) unless this runs where Linux guests boot and the test host's
/// container engines (containerd 1.6 and 2.x, Docker 28, protoc) are installed.
pub fn require_test_host_engines() {
    assert!(
        kvm_boots_linux(),
        "this test boots Linux and /dev/kvm here cannot (missing or PVM); run it through `make test-kvm`"
    );
    assert_eq!(
        std::env::var("MOAT_TESTHOST").as_deref(),
        Ok("1"),
        "this test needs the test host's containerd and Docker builds; run it through `make test-kvm`"
    );
}

/// Runs `program args` in the repository root with inherited stdio (the scripts
/// print every step) and fails the test if it fails.
pub fn run_script(program: &str, args: &[&str]) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = std::process::Command::new(program).args(args).current_dir(repo).status().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(status.success(), "`{program} {}` failed ({status}); its steps are printed above", args.join(" "));
}
