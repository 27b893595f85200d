//! containerd-shim-moat-v2 under Kubernetes' CRI, end to end: a CRI v1 client
//! (integration/cri_test.py, gRPC like the kubelet) drives the CRI plugin of a real
//! containerd 1.6 and 2.x in the test host; a pod with the runtime handler `moat` and
//! two containers must share one shim and one VM, log, exec and stop as Kubernetes
//! expects, and leave nothing behind.
//!
//! Every test boots Linux guests, so they are `#[ignore]`d; `make test-kvm` runs each
//! in its own test host. The script prints each step and its output; the test fails
//! if the script does.

use std::process::Command;

use moat_integration::kvm_boots_linux;

fn cri_test(version: &str) {
    assert!(
        kvm_boots_linux(),
        "this test boots Linux and /dev/kvm here cannot (missing or PVM); run it through `make test-kvm`"
    );
    assert_eq!(
        std::env::var("MOAT_TESTHOST").as_deref(),
        Ok("1"),
        "this test needs the test host's containerd builds, protoc and moat; run it through `make test-kvm`"
    );
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let status = Command::new("python3")
        .args(["integration/cri_test.py", version])
        .current_dir(repo)
        .status()
        .expect("run python3");
    assert!(status.success(), "`python3 integration/cri_test.py {version}` failed ({status}); its steps are printed above");
}

#[test]
#[ignore = "boots Linux: run by `make test-kvm`"]
fn cri_containerd_1_6() {
    cri_test("1.6");
}

#[test]
#[ignore = "boots Linux: run by `make test-kvm`"]
fn cri_containerd_2() {
    cri_test("2");
}
