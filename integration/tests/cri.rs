//! containerd-shim-moat-v2 under Kubernetes' CRI, end to end: a CRI v1 client
//! (integration/cri_test.py, gRPC like the kubelet) drives the CRI plugin of a real
//! containerd 1.6 and 2.x in the test host; a pod with the runtime handler `moat` and
//! two containers must share one shim and one VM, log, exec and stop as Kubernetes
//! expects, and leave nothing behind.
//!
//! Every test boots Linux guests, so they are `#[ignore]`d; `make test-kvm` runs each
//! in its own test host. The script prints each step and its output; the test fails
//! if the script does.

use moat_integration::{require_test_host_engines, run_script};

fn cri_test(version: &str) {
    require_test_host_engines();
    run_script("python3", &["integration/cri_test.py", version]);
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
