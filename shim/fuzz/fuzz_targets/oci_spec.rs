//! A container manager's bundle spec (config.json) as the shim reads it: the pod it
//! belongs to, the VM size its `io.moat.*` annotations ask for, and the spec rewritten
//! for the guest. The spec comes from whoever creates containers (a pod author, through
//! Kubernetes or Docker).
//!
//! Input: the bytes of config.json. The bundle also holds a file `hosts` and a
//! directory `data`, so relative bind sources can name something.
//!
//! Checked: no panic; a pod id is never empty; a pod size stays within the host's
//! limits (here 4 CPUs and 8 GiB); a rewritten spec has its root in the guest share, no
//! hooks, no host cgroup path, only the guest's namespaces and none by path, and every
//! bind mount sourced from the container's volume directory, one per host bind.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use moat_config::{HostResources, MoatConfig};
use moat_shim::oci::{guest_spec, pod_id, pod_size, read_bundle_spec, GuestLayout};
use serde_json::Value;

const NAMESPACES: &[&str] = &["pid", "ipc", "uts", "mount", "cgroup", "user"];

fn is_bind(m: &Value) -> bool {
    m.get("type").and_then(Value::as_str) == Some("bind")
        || m.get("options").and_then(Value::as_array).is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

fn run(data: &[u8]) {
    let bundle = tempfile::Builder::new().prefix("moat-fuzz-").tempdir().expect("a temporary directory");
    std::fs::write(bundle.path().join("config.json"), data).expect("config.json");
    std::fs::write(bundle.path().join("hosts"), "127.0.0.1 localhost\n").expect("hosts");
    std::fs::create_dir(bundle.path().join("data")).expect("data");
    let Ok(spec) = read_bundle_spec(bundle.path()) else { return };

    assert!(!pod_id(&spec, "c1").is_empty(), "an empty pod id");
    let host = HostResources { cpus: 4, memory_mib: 8192 };
    let cfg = MoatConfig::defaults_on(Path::new("/opt/moat/bin"), host);
    if let Ok(size) = pod_size(&spec, &cfg) {
        assert!((1..=4).contains(&size.vcpus), "pod size of {} vCPUs", size.vcpus);
        assert!((32..=8192).contains(&size.memory_mib), "pod size of {} MiB", size.memory_mib);
    }

    let layout = GuestLayout { bundle: bundle.path().into(), guest_dir: "/run/moat/shared/c1".into(), guest_vol_dir: "/run/moat/volumes/c1".into() };
    let before = spec.clone();
    // With the default seccomp profile on (the host config's default), so it too is
    // applied to hostile specs.
    let Ok((g, binds)) = guest_spec(spec, &layout, true) else { return };
    assert_eq!(g["root"]["path"], "/run/moat/shared/c1/rootfs", "root not in the share");
    assert!(g.get("hooks").is_none(), "hooks kept");
    if let Some(linux) = g.get("linux").filter(|l| l.is_object()) {
        assert!(linux.get("cgroupsPath").is_none(), "host cgroup path kept");
        for n in linux.get("namespaces").and_then(Value::as_array).into_iter().flatten() {
            let t = n.get("type").and_then(Value::as_str).unwrap_or_default();
            assert!(NAMESPACES.contains(&t), "namespace {n} kept");
            assert!(n.get("path").is_none(), "namespace path kept: {n}");
        }
    }
    let mut seen = 0;
    let mounts_before = before.get("mounts").and_then(Value::as_array).cloned().unwrap_or_default();
    for (m, was) in g.get("mounts").and_then(Value::as_array).into_iter().flatten().zip(&mounts_before) {
        if was.get("type").and_then(Value::as_str) == Some("cgroup") || !is_bind(was) {
            continue;
        }
        assert_eq!(m["source"], format!("/run/moat/volumes/c1/{seen}"), "bind source not in the volume share");
        assert_eq!(binds[seen].target, seen.to_string());
        seen += 1;
    }
    assert_eq!(seen, binds.len(), "host binds without a mount");
}

fuzz_target!(|data: &[u8]| run(data));
