//! A container runtime's bundle (`config.json`, as containerd writes it) turned into
//! what moat needs: the pod it belongs to, the VM size its annotations ask for, and
//! the spec rewritten for the guest.
//!
//! The guest sees the host only through the pod's virtio-fs share: the rootfs and
//! every host file or directory a bind mount names are mounted under the share, and
//! the spec points at them there. Host-only settings (namespace paths of the host,
//! the host cgroup path, hooks that run host binaries) are dropped. A spec without a
//! seccomp profile gets moat's default one (`seccomp.rs`) unless it is privileged or
//! the host config turned that off.

use std::path::{Path, PathBuf};

use moat_config::MoatConfig;
use serde_json::{Map, Value};

/// The annotation CRI puts on every container of a pod (and on the sandbox itself).
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// Annotations that tune a pod start with this.
pub const MOAT_ANNOTATION_PREFIX: &str = "io.moat.";
pub const VCPUS_ANNOTATION: &str = "io.moat.vcpus";
pub const MEMORY_ANNOTATION: &str = "io.moat.memory_mib";
/// Namespace types a guest container gets afresh. `network` is left out: the guest has
/// no NIC yet, so the container shares the guest's (loopback only).
const GUEST_NAMESPACES: &[&str] = &["pid", "ipc", "uts", "mount", "cgroup", "user"];

/// Why a bundle cannot run in moat.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid OCI spec: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("annotation {key}: {message}")]
    Annotation { key: String, message: String },
    #[error("mount {destination}: {message}")]
    Mount { destination: String, message: String },
    #[error("spec.{field} must be {what}")]
    Field { field: &'static str, what: &'static str },
    #[error(transparent)]
    AboveLimit(#[from] moat_config::AboveLimit),
}

/// Reads `bundle/config.json`.
pub fn read_bundle_spec(bundle: &Path) -> Result<Value, OciError> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|source| OciError::Read { path: path.clone(), source })?;
    let v: Value = serde_json::from_slice(&text).map_err(|e| OciError::Parse { path: path.clone(), message: e.to_string() })?;
    if !v.is_object() {
        return Err(OciError::Parse { path, message: "not a JSON object".into() });
    }
    Ok(v)
}

fn annotations(spec: &Value) -> impl Iterator<Item = (&str, &Value)> {
    spec.get("annotations").and_then(Value::as_object).into_iter().flat_map(|m| m.iter().map(|(k, v)| (k.as_str(), v)))
}

/// The pod a container belongs to: CRI's sandbox id if the spec carries one, else
/// the container's own id (one pod per container).
pub fn pod_id(spec: &Value, container_id: &str) -> String {
    annotations(spec)
        .find(|(k, _)| *k == SANDBOX_ID_ANNOTATION)
        .and_then(|(_, v)| v.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(container_id)
        .to_string()
}

/// The VM a pod gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodSize {
    pub vcpus: u8,
    pub memory_mib: u32,
}

/// The pod's size: the host config's defaults, overridden by `io.moat.*`
/// annotations, which must stay within the host's `max_vcpus` and `max_memory_mib`.
/// Any other `io.moat.` key is an error (a typo must not be ignored).
pub fn pod_size(spec: &Value, cfg: &MoatConfig) -> Result<PodSize, OciError> {
    let mut size = PodSize { vcpus: cfg.vcpus, memory_mib: cfg.memory_mib };
    for (key, value) in annotations(spec).filter(|(k, _)| k.starts_with(MOAT_ANNOTATION_PREFIX)) {
        let bad = |message: String| OciError::Annotation { key: key.to_string(), message };
        let n = || -> Result<u64, OciError> {
            value.as_str().and_then(|s| s.trim().parse::<u64>().ok()).ok_or_else(|| bad(format!("{value} is not a whole number")))
        };
        match key {
            VCPUS_ANNOTATION => {
                size.vcpus = moat_config::check_vcpus(n()?).map_err(|e| bad(e.to_string()))?;
                cfg.max_vcpus.check(key, u64::from(size.vcpus))?;
            }
            MEMORY_ANNOTATION => {
                size.memory_mib = moat_config::check_memory(n()?).map_err(|e| bad(e.to_string()))?;
                cfg.max_memory_mib.check(key, u64::from(size.memory_mib))?;
            }
            _ => return Err(bad(format!("unknown moat annotation; known: {VCPUS_ANNOTATION}, {MEMORY_ANNOTATION}"))),
        }
    }
    Ok(size)
}

/// A host file or directory the guest reaches through the share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBind {
    pub source: PathBuf,
    /// Relative to the container's dir in the volume share.
    pub target: String,
    pub is_dir: bool,
    pub read_only: bool,
}

/// Where a container's files are, in the share (host side) and in the guest.
#[derive(Clone, Debug)]
pub struct GuestLayout {
    /// The bundle, for relative paths in the spec.
    pub bundle: PathBuf,
    /// The container's dir in the guest (`<guest share>/<container id>`).
    pub guest_dir: String,
    /// The container's dir in the guest's volume share (`<guest volumes>/<container id>`).
    pub guest_vol_dir: String,
}

impl GuestLayout {
    pub fn guest_rootfs(&self) -> String {
        format!("{}/rootfs", self.guest_dir)
    }
}

fn is_bind(m: &Map<String, Value>) -> bool {
    m.get("type").and_then(Value::as_str) == Some("bind")
        || m.get("options").and_then(Value::as_array).is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// Rewrites a bundle's spec for the guest; returns it and the host binds to make
/// under the container's dir in the share before the guest uses it.
/// `default_seccomp` is the host config's key of that name.
pub fn guest_spec(mut spec: Value, layout: &GuestLayout, default_seccomp: bool) -> Result<(Value, Vec<HostBind>), OciError> {
    let obj = spec.as_object_mut().ok_or(OciError::Field { field: "(top)", what: "an object" })?;
    let readonly = obj.get("root").and_then(|r| r.get("readonly")).and_then(Value::as_bool).unwrap_or(false);
    obj.insert("root".into(), serde_json::json!({"path": layout.guest_rootfs(), "readonly": readonly}));
    if obj.remove("hooks").is_some_and(|h| h.as_object().is_some_and(|h| h.values().any(|v| v.as_array().is_some_and(|a| !a.is_empty())))) {
        log::warn!("spec.hooks dropped: they would run host programs, which do not exist in the guest");
    }
    let mut binds = Vec::new();
    if let Some(mounts) = obj.get_mut("mounts").and_then(Value::as_array_mut) {
        for m in mounts.iter_mut() {
            let Some(m) = m.as_object_mut() else { return Err(OciError::Field { field: "mounts[]", what: "an object" }) };
            let destination = m.get("destination").and_then(Value::as_str).unwrap_or_default().to_string();
            let err = |message: String| OciError::Mount { destination: destination.clone(), message };
            if m.get("type").and_then(Value::as_str) == Some("cgroup") {
                // The guest is cgroup v2 only (runc makes the same translation).
                m.insert("type".into(), "cgroup2".into());
                continue;
            }
            if !is_bind(m) {
                continue;
            }
            let source = m.get("source").and_then(Value::as_str).ok_or_else(|| err("a bind mount needs a source".into()))?;
            let host = if Path::new(source).is_absolute() { PathBuf::from(source) } else { layout.bundle.join(source) };
            let meta = std::fs::metadata(&host).map_err(|e| err(format!("bind source {}: {e}", host.display())))?;
            if !meta.is_dir() && !meta.is_file() {
                return Err(err(format!("bind source {} is neither a file nor a directory: it cannot be shared with the guest", host.display())));
            }
            let read_only = m.get("options").and_then(Value::as_array).is_some_and(|o| o.iter().any(|x| x == "ro"));
            let target = binds.len().to_string();
            m.insert("source".into(), format!("{}/{target}", layout.guest_vol_dir).into());
            binds.push(HostBind { source: host, target, is_dir: meta.is_dir(), read_only });
        }
    }
    if let Some(linux) = obj.get_mut("linux").and_then(Value::as_object_mut) {
        // The host's cgroup path and SELinux mount label mean nothing in the guest.
        linux.remove("cgroupsPath");
        linux.remove("mountLabel");
        if let Some(ns) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
            ns.retain(|n| n.get("type").and_then(Value::as_str).is_some_and(|t| GUEST_NAMESPACES.contains(&t)));
            for n in ns.iter_mut().filter_map(Value::as_object_mut) {
                // A path names a host namespace (/proc/<pid>/ns/...): the guest makes
                // its own.
                n.remove("path");
            }
        }
    }
    match crate::seccomp::apply_default(&mut spec, default_seccomp) {
        crate::seccomp::Decision::Applied => log::debug!("{}: moat's default seccomp profile applied", layout.guest_dir),
        d => log::debug!("{}: no default seccomp profile ({d:?})", layout.guest_dir),
    }
    Ok((spec, binds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg() -> MoatConfig {
        MoatConfig::defaults(Path::new("/opt/moat/bin"))
    }

    #[test]
    fn pods_group_by_sandbox_id() {
        assert_eq!(pod_id(&json!({}), "c1"), "c1");
        assert_eq!(pod_id(&json!({"annotations": {SANDBOX_ID_ANNOTATION: "pod9"}}), "c1"), "pod9");
        assert_eq!(pod_id(&json!({"annotations": {SANDBOX_ID_ANNOTATION: ""}}), "c1"), "c1");
    }

    #[test]
    fn pod_size_from_annotations() {
        assert_eq!(pod_size(&json!({}), &cfg()).expect("defaults"), PodSize { vcpus: 1, memory_mib: 256 });
        let s = json!({"annotations": {VCPUS_ANNOTATION: "2", MEMORY_ANNOTATION: "512", "other": "x"}});
        assert_eq!(pod_size(&s, &cfg()).expect("set"), PodSize { vcpus: 2, memory_mib: 512 });
        let bad = |k: &str, v: &str| pod_size(&json!({"annotations": {k: v}}), &cfg()).expect_err("bad").to_string();
        assert!(bad("io.moat.vcpu", "2").contains("unknown moat annotation"));
        assert!(bad(VCPUS_ANNOTATION, "0").contains(VCPUS_ANNOTATION));
        assert!(bad(VCPUS_ANNOTATION, "two").contains("not a whole number"));
        assert!(bad(MEMORY_ANNOTATION, "1").contains(MEMORY_ANNOTATION));
    }

    #[test]
    fn pod_size_stays_within_the_hosts_limits() {
        let host = moat_config::HostResources { cpus: 4, memory_mib: 8192 };
        let defaults = MoatConfig::defaults_on(Path::new("/opt/moat/bin"), host);
        let cfg = MoatConfig::from_toml_on(Path::new("/etc/moat/config.toml"), "max_vcpus = 2\nmax_memory_mib = 1024", defaults.clone(), host)
            .expect("config");
        let size = |cfg: &MoatConfig, k: &str, v: &str| pod_size(&json!({"annotations": {k: v}}), cfg);
        assert_eq!(size(&cfg, VCPUS_ANNOTATION, "2").expect("at the limit").vcpus, 2);
        assert_eq!(size(&cfg, MEMORY_ANNOTATION, "1024").expect("at the limit").memory_mib, 1024);
        let e = size(&cfg, VCPUS_ANNOTATION, "32").expect_err("above max_vcpus");
        assert!(matches!(e, OciError::AboveLimit(_)), "{e:?}");
        assert_eq!(e.to_string(), "io.moat.vcpus=32 is above the host's limit max_vcpus=2 (set in /etc/moat/config.toml)");
        let e = size(&cfg, MEMORY_ANNOTATION, "1025").expect_err("above max_memory_mib").to_string();
        assert_eq!(e, "io.moat.memory_mib=1025 is above the host's limit max_memory_mib=1024 (set in /etc/moat/config.toml)");
        // Without a maximum in the config, the host's own figures are the limit.
        let e = size(&defaults, VCPUS_ANNOTATION, "5").expect_err("above the host's CPUs").to_string();
        assert!(e.starts_with("io.moat.vcpus=5 is above the host's limit max_vcpus=4 (this host's online CPUs"), "{e}");
        let e = size(&defaults, MEMORY_ANNOTATION, "8193").expect_err("above MemTotal").to_string();
        assert!(e.starts_with("io.moat.memory_mib=8193 is above the host's limit max_memory_mib=8192"), "{e}");
    }

    #[test]
    fn spec_is_rewritten_for_the_guest() {
        let bundle = tempfile::tempdir().expect("bundle");
        std::fs::write(bundle.path().join("hosts"), "127.0.0.1 localhost\n").expect("hosts");
        let data = tempfile::tempdir().expect("data");
        let spec = json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/"},
            "root": {"path": "rootfs", "readonly": true},
            "hooks": {"prestart": [{"path": "/usr/bin/x"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]},
                {"destination": "/etc/hosts", "type": "bind", "source": "hosts", "options": ["rbind", "ro"]},
                {"destination": "/data", "source": data.path(), "options": ["rbind"]}
            ],
            "linux": {
                "cgroupsPath": "/default/c1",
                "namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"}, {"type": "ipc", "path": "/proc/9/ns/ipc"}, {"type": "mount"}],
                "resources": {"pids": {"limit": 10}}
            }
        });
        let layout = GuestLayout { bundle: bundle.path().into(), guest_dir: "/run/moat/shared/c1".into(), guest_vol_dir: "/run/moat/volumes/c1".into() };
        let (g, binds) = guest_spec(spec, &layout, true).expect("rewrite");
        assert_eq!(g["root"], json!({"path": "/run/moat/shared/c1/rootfs", "readonly": true}));
        assert!(g.get("hooks").is_none());
        assert_eq!(g["mounts"][0]["type"], "proc");
        assert_eq!(g["mounts"][1]["type"], "cgroup2");
        assert_eq!(g["mounts"][2]["source"], "/run/moat/volumes/c1/0");
        assert_eq!(g["mounts"][3]["source"], "/run/moat/volumes/c1/1");
        assert_eq!(
            binds,
            vec![
                HostBind { source: bundle.path().join("hosts"), target: "0".into(), is_dir: false, read_only: true },
                HostBind { source: data.path().into(), target: "1".into(), is_dir: true, read_only: false },
            ]
        );
        assert!(g["linux"].get("cgroupsPath").is_none());
        assert_eq!(g["linux"]["namespaces"], json!([{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}]));
        assert_eq!(g["linux"]["resources"]["pids"]["limit"], 10);
        assert_eq!(g["process"]["args"], json!(["sh"]));
        // No capabilities and no profile: moat's default profile.
        assert_eq!(g["linux"]["seccomp"], crate::seccomp::default_profile(&[]));
    }

    /// The default seccomp profile as containerd's bundles meet it: a spec without a
    /// profile gets it, a privileged one does not, one with its own keeps it, and the
    /// host config can turn it off.
    #[test]
    fn bundles_get_the_default_seccomp_profile_by_the_rule() {
        let layout = GuestLayout { bundle: "/nonexistent".into(), guest_dir: "/g".into(), guest_vol_dir: "/v".into() };
        let caps = |c: &[&str]| json!({"bounding": c, "effective": c, "permitted": c});
        let plain = json!({"process": {"args": ["sh"], "capabilities": caps(&["CAP_CHOWN", "CAP_SYS_CHROOT"])}, "linux": {}});
        let (g, _) = guest_spec(plain.clone(), &layout, true).expect("rewrite");
        assert_eq!(g["linux"]["seccomp"], crate::seccomp::default_profile(&["CAP_CHOWN", "CAP_SYS_CHROOT"]));
        let (g, _) = guest_spec(plain, &layout, false).expect("rewrite");
        assert!(g["linux"].get("seccomp").is_none(), "default_seccomp = false");
        let privileged = json!({"process": {"args": ["sh"], "capabilities": caps(&["CAP_CHOWN", "CAP_SYS_ADMIN"])}, "linux": {}});
        let (g, _) = guest_spec(privileged, &layout, true).expect("rewrite");
        assert!(g["linux"].get("seccomp").is_none(), "privileged");
        let own = json!({"defaultAction": "SCMP_ACT_LOG"});
        let with_own = json!({"process": {"args": ["sh"]}, "linux": {"seccomp": own}});
        let (g, _) = guest_spec(with_own, &layout, true).expect("rewrite");
        assert_eq!(g["linux"]["seccomp"], own);
    }

    #[test]
    fn unusable_binds_are_named() {
        let layout = GuestLayout { bundle: "/nonexistent".into(), guest_dir: "/g".into(), guest_vol_dir: "/v".into() };
        let spec = json!({"mounts": [{"destination": "/x", "type": "bind", "source": "/nonexistent/x"}]});
        let e = guest_spec(spec, &layout, true).expect_err("missing").to_string();
        assert!(e.starts_with("mount /x: bind source /nonexistent/x"), "{e}");
        let spec = json!({"mounts": [{"destination": "/n", "type": "bind", "source": "/dev/null"}]});
        let e = guest_spec(spec, &layout, true).expect_err("device").to_string();
        assert!(e.contains("neither a file nor a directory"), "{e}");
    }
}
