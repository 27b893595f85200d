//! The parts of the OCI runtime spec (config.json) the agent acts on, parsed with
//! serde and then validated. Fields the agent does not implement are not silently
//! dropped: each struct keeps the keys it does not know, and validation refuses
//! those that would change what the container is, naming the field. Keys that only
//! matter to other runtimes (annotations, AppArmor) are accepted and ignored.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{AgentError, Result};

type Extra = Map<String, Value>;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub root: Option<Root>,
    #[serde(default)]
    pub process: Option<Process>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub domainname: Option<String>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub linux: Option<Linux>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Root {
    pub path: String,
    #[serde(default)]
    pub readonly: bool,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Default, Clone, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    #[serde(default)]
    pub terminal: bool,
    #[serde(default)]
    pub console_size: Option<ConsoleSize>,
    #[serde(default)]
    pub user: User,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: String,
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    #[serde(default)]
    pub no_new_privileges: bool,
    #[serde(default)]
    pub oom_score_adj: Option<i32>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Default, Clone, Copy, Deserialize, serde::Serialize)]
pub struct ConsoleSize {
    pub height: u16,
    pub width: u16,
}

#[derive(Debug, Default, Clone, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default)]
    pub umask: Option<u32>,
    #[serde(default)]
    pub additional_gids: Vec<u32>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Default, Clone, Deserialize, serde::Serialize)]
pub struct Capabilities {
    #[serde(default)]
    pub bounding: Vec<String>,
    #[serde(default)]
    pub effective: Vec<String>,
    #[serde(default)]
    pub inheritable: Vec<String>,
    #[serde(default)]
    pub permitted: Vec<String>,
    #[serde(default)]
    pub ambient: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct Rlimit {
    #[serde(rename = "type")]
    pub kind: String,
    pub hard: u64,
    pub soft: u64,
}

#[derive(Debug, Default, Clone, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mount {
    pub destination: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Linux {
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub resources: Option<Resources>,
    #[serde(default)]
    pub masked_paths: Vec<String>,
    #[serde(default)]
    pub readonly_paths: Vec<String>,
    #[serde(default)]
    pub sysctl: BTreeMap<String, String>,
    #[serde(default)]
    pub seccomp: Option<Seccomp>,
    #[serde(default)]
    pub devices: Vec<Device>,
    #[serde(default)]
    pub rootfs_propagation: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct Namespace {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    #[serde(rename = "type")]
    pub kind: String,
    pub path: String,
    #[serde(default)]
    pub major: i64,
    #[serde(default)]
    pub minor: i64,
    #[serde(default)]
    pub file_mode: Option<u32>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    #[serde(default)]
    pub memory: Option<Memory>,
    #[serde(default)]
    pub cpu: Option<Cpu>,
    #[serde(default)]
    pub pids: Option<Pids>,
    #[serde(default, rename = "blockIO")]
    pub block_io: Option<BlockIo>,
    #[serde(default)]
    pub unified: BTreeMap<String, String>,
    /// Device cgroup rules. The guest's device nodes are the VM's own, and cgroup v2
    /// enforces these only through eBPF; the rules are accepted and not enforced.
    #[serde(default)]
    #[allow(dead_code)]
    pub devices: Vec<Value>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    pub limit: Option<i64>,
    pub reservation: Option<i64>,
    pub swap: Option<i64>,
    // Accepted and ignored: kernel memory limits are gone from cgroup v2, and v2 has
    // no per-cgroup swappiness (runc ignores these too).
    #[allow(dead_code)]
    pub kernel: Option<i64>,
    #[serde(rename = "kernelTCP")]
    #[allow(dead_code)]
    pub kernel_tcp: Option<i64>,
    #[allow(dead_code)]
    pub swappiness: Option<u64>,
    #[serde(rename = "disableOOMKiller")]
    pub disable_oom_killer: Option<bool>,
    #[allow(dead_code)]
    pub use_hierarchy: Option<bool>,
    #[allow(dead_code)]
    pub check_before_update: Option<bool>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cpu {
    pub shares: Option<u64>,
    pub quota: Option<i64>,
    pub burst: Option<u64>,
    pub period: Option<u64>,
    pub realtime_runtime: Option<i64>,
    pub realtime_period: Option<u64>,
    pub cpus: Option<String>,
    pub mems: Option<String>,
    pub idle: Option<i64>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct Pids {
    pub limit: i64,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockIo {
    pub weight: Option<u16>,
    /// cgroup v2 has no leaf weight; ignored.
    #[allow(dead_code)]
    pub leaf_weight: Option<u16>,
    #[serde(default)]
    pub weight_device: Vec<WeightDevice>,
    #[serde(default)]
    pub throttle_read_bps_device: Vec<ThrottleDevice>,
    #[serde(default)]
    pub throttle_write_bps_device: Vec<ThrottleDevice>,
    #[serde(default, rename = "throttleReadIOPSDevice")]
    pub throttle_read_iops_device: Vec<ThrottleDevice>,
    #[serde(default, rename = "throttleWriteIOPSDevice")]
    pub throttle_write_iops_device: Vec<ThrottleDevice>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightDevice {
    pub major: i64,
    pub minor: i64,
    pub weight: Option<u16>,
    #[allow(dead_code)]
    pub leaf_weight: Option<u16>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct ThrottleDevice {
    pub major: i64,
    pub minor: i64,
    pub rate: u64,
}

#[derive(Debug, Default, Clone, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Seccomp {
    pub default_action: String,
    #[serde(default)]
    pub default_errno_ret: Option<u32>,
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub listener_path: Option<String>,
    #[serde(default)]
    pub syscalls: Vec<SyscallRule>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Default, Clone, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyscallRule {
    pub names: Vec<String>,
    pub action: String,
    #[serde(default)]
    pub errno_ret: Option<u32>,
    #[serde(default)]
    pub args: Vec<SyscallArg>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Debug, Default, Clone, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyscallArg {
    pub index: u32,
    pub value: u64,
    #[serde(default)]
    pub value_two: u64,
    pub op: String,
}

fn invalid(msg: impl Into<String>) -> AgentError {
    AgentError::InvalidArgument(msg.into())
}

/// Refuses any key of `extra` not in `ignored`; `at` names the object for the message.
fn check_extra(at: &str, extra: &Extra, ignored: &[&str]) -> Result<()> {
    for (key, value) in extra {
        if ignored.contains(&key.as_str()) || value.is_null() {
            continue;
        }
        // Empty lists and objects ask for nothing.
        let empty = matches!(value, Value::Array(a) if a.is_empty())
            || matches!(value, Value::Object(o) if o.is_empty())
            || matches!(value, Value::String(s) if s.is_empty());
        if !empty {
            return Err(invalid(format!("{at}.{key} is not supported by moat-agent")));
        }
    }
    Ok(())
}

/// Parses a JSON document of type `T`, naming `what` on failure.
pub fn parse_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| invalid(format!("{what} is not valid: {e}")))
}

/// Parses and validates a container's spec.
pub fn parse_spec(bytes: &[u8]) -> Result<Spec> {
    let spec: Spec = parse_json("spec", bytes)?;
    spec.validate()?;
    Ok(spec)
}

/// Parses and validates an exec's `process` object.
pub fn parse_process(bytes: &[u8]) -> Result<Process> {
    let p: Process = parse_json("process", bytes)?;
    p.validate("process")?;
    Ok(p)
}

/// The namespaces the agent can create or join.
pub const NAMESPACE_KINDS: &[&str] = &["pid", "network", "mount", "ipc", "uts", "cgroup"];

impl Spec {
    pub fn validate(&self) -> Result<()> {
        check_extra("spec", &self.extra, &["ociVersion", "annotations", "hooks"])?;
        if let Some(hooks) = self.extra.get("hooks") {
            let any = hooks.as_object().is_some_and(|h| h.values().any(|v| v.as_array().is_some_and(|a| !a.is_empty())));
            if any {
                return Err(invalid("spec.hooks are not supported in the guest: the host must run or drop them"));
            }
        }
        let root = self.root.as_ref().ok_or_else(|| invalid("spec.root is missing"))?;
        check_extra("spec.root", &root.extra, &[])?;
        if !root.path.starts_with('/') {
            return Err(invalid(format!("spec.root.path {:?} must be an absolute guest path", root.path)));
        }
        let process = self.process.as_ref().ok_or_else(|| invalid("spec.process is missing"))?;
        process.validate("spec.process")?;
        for (i, m) in self.mounts.iter().enumerate() {
            check_extra(&format!("spec.mounts[{i}]"), &m.extra, &[])?;
            if !m.destination.starts_with('/') {
                return Err(invalid(format!("spec.mounts[{i}].destination {:?} must be absolute", m.destination)));
            }
        }
        let linux = self.linux.as_ref().ok_or_else(|| invalid("spec.linux is missing"))?;
        check_extra(
            "spec.linux",
            &linux.extra,
            &["cgroupsPath", "mountLabel", "uidMappings", "gidMappings"],
        )?;
        for key in ["uidMappings", "gidMappings"] {
            if linux.extra.get(key).is_some_and(|v| v.as_array().is_some_and(|a| !a.is_empty())) {
                return Err(invalid(format!("spec.linux.{key}: user namespaces are not supported")));
            }
        }
        let mut seen = Vec::new();
        for ns in &linux.namespaces {
            if !NAMESPACE_KINDS.contains(&ns.kind.as_str()) {
                return Err(invalid(format!("spec.linux.namespaces: namespace type {:?} is not supported", ns.kind)));
            }
            if seen.contains(&ns.kind) {
                return Err(invalid(format!("spec.linux.namespaces: {:?} is listed twice", ns.kind)));
            }
            seen.push(ns.kind.clone());
            if ns.kind == "mount" && ns.path.is_some() {
                return Err(invalid("spec.linux.namespaces: joining a mount namespace is not supported"));
            }
            if let Some(p) = &ns.path {
                if !p.starts_with('/') {
                    return Err(invalid(format!("spec.linux.namespaces: path {p:?} must be absolute")));
                }
            }
        }
        if !seen.iter().any(|k| k == "mount") {
            return Err(invalid("spec.linux.namespaces must include a new mount namespace"));
        }
        if self.hostname.as_deref().is_some_and(|h| !h.is_empty()) && !linux.new_namespace("uts") {
            return Err(invalid("spec.hostname needs a new uts namespace"));
        }
        if let Some(r) = &linux.resources {
            r.validate("spec.linux.resources")?;
        }
        if let Some(s) = &linux.seccomp {
            crate::seccomp::compile(s)?;
        }
        for key in linux.sysctl.keys() {
            sysctl_path(key)?;
        }
        for d in &linux.devices {
            if !d.path.starts_with("/dev/") || d.path.contains("/../") {
                return Err(invalid(format!("spec.linux.devices: path {:?} must be under /dev", d.path)));
            }
            if !["c", "b", "u", "p"].contains(&d.kind.as_str()) {
                return Err(invalid(format!("spec.linux.devices: {} has unknown type {:?}", d.path, d.kind)));
            }
        }
        if let Some(p) = &linux.rootfs_propagation {
            if !["", "private", "rprivate", "slave", "rslave", "shared", "rshared", "unbindable", "runbindable"]
                .contains(&p.as_str())
            {
                return Err(invalid(format!("spec.linux.rootfsPropagation {p:?} is not a propagation mode")));
            }
        }
        Ok(())
    }

    pub fn linux(&self) -> &Linux {
        self.linux.as_ref().expect("validate() checked spec.linux")
    }
}

impl Linux {
    /// True if the spec asks for a new namespace of `kind` (listed without a path).
    pub fn new_namespace(&self, kind: &str) -> bool {
        self.namespaces.iter().any(|n| n.kind == kind && n.path.is_none())
    }
}

/// The /proc/sys path of a sysctl key (`net.ipv4.ip_forward`), refusing keys that
/// would reach outside /proc/sys.
pub fn sysctl_path(key: &str) -> Result<String> {
    let ok = !key.is_empty()
        && key.split(['.', '/']).all(|p| !p.is_empty() && p != ".." && p != ".")
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if !ok {
        return Err(invalid(format!("spec.linux.sysctl: {key:?} is not a sysctl name")));
    }
    Ok(format!("/proc/sys/{}", key.replace('.', "/")))
}

impl Process {
    pub fn validate(&self, at: &str) -> Result<()> {
        check_extra(at, &self.extra, &["apparmorProfile", "selinuxLabel", "commandLine"])?;
        check_extra(&format!("{at}.user"), &self.user.extra, &["username"])?;
        if self.extra.get("selinuxLabel").and_then(Value::as_str).is_some_and(|s| !s.is_empty()) {
            return Err(invalid(format!("{at}.selinuxLabel: SELinux is not supported in the guest")));
        }
        if self.args.is_empty() || self.args[0].is_empty() {
            return Err(invalid(format!("{at}.args must name a program")));
        }
        if !self.cwd.starts_with('/') {
            return Err(invalid(format!("{at}.cwd {:?} must be an absolute path", self.cwd)));
        }
        for e in &self.env {
            if !e.contains('=') || e.starts_with('=') || e.contains('\0') {
                return Err(invalid(format!("{at}.env entry {e:?} is not NAME=value")));
            }
        }
        if self.args.iter().any(|a| a.contains('\0')) {
            return Err(invalid(format!("{at}.args contain a NUL byte")));
        }
        if let Some(c) = &self.capabilities {
            for (set, names) in [
                ("bounding", &c.bounding),
                ("effective", &c.effective),
                ("inheritable", &c.inheritable),
                ("permitted", &c.permitted),
                ("ambient", &c.ambient),
            ] {
                for n in names {
                    if crate::caps::by_name(n).is_none() {
                        return Err(invalid(format!("{at}.capabilities.{set}: unknown capability {n:?}")));
                    }
                }
            }
        }
        for r in &self.rlimits {
            if crate::caps::rlimit_by_name(&r.kind).is_none() {
                return Err(invalid(format!("{at}.rlimits: unknown type {:?}", r.kind)));
            }
            if r.soft > r.hard {
                return Err(invalid(format!("{at}.rlimits: {} soft limit is above the hard limit", r.kind)));
            }
        }
        if let Some(adj) = self.oom_score_adj {
            if !(-1000..=1000).contains(&adj) {
                return Err(invalid(format!("{at}.oomScoreAdj {adj} is outside -1000..=1000")));
            }
        }
        if let Some(m) = self.user.umask {
            if m > 0o777 {
                return Err(invalid(format!("{at}.user.umask {m:o} is not a mode")));
            }
        }
        Ok(())
    }
}

impl Resources {
    pub fn validate(&self, at: &str) -> Result<()> {
        check_extra(at, &self.extra, &[])?;
        if let Some(m) = &self.memory {
            check_extra(&format!("{at}.memory"), &m.extra, &[])?;
            if m.disable_oom_killer == Some(true) {
                return Err(invalid(format!("{at}.memory.disableOOMKiller is not supported by cgroup v2")));
            }
        }
        if let Some(c) = &self.cpu {
            check_extra(&format!("{at}.cpu"), &c.extra, &[])?;
            if c.realtime_runtime.is_some_and(|v| v != 0) || c.realtime_period.is_some_and(|v| v != 0) {
                return Err(invalid(format!("{at}.cpu realtime settings are not supported by cgroup v2")));
            }
        }
        if let Some(b) = &self.block_io {
            check_extra(&format!("{at}.blockIO"), &b.extra, &[])?;
        }
        for key in self.unified.keys() {
            if key.contains('/') || key.starts_with('.') || !key.contains('.') || key.starts_with("cgroup.") {
                return Err(invalid(format!("{at}.unified: {key:?} is not a controller file")));
            }
        }
        crate::cgroup::resource_writes(self).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn minimal() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.1.0",
            "root": {"path": "/run/rootfs", "readonly": true},
            "process": {"args": ["sh"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}},
            "hostname": "box",
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}, {"type": "uts"}]}
        })
    }

    fn parse(v: &serde_json::Value) -> Result<Spec> {
        parse_spec(v.to_string().as_bytes())
    }

    #[test]
    fn a_minimal_spec_parses() {
        let s = parse(&minimal()).expect("valid");
        assert_eq!(s.root.as_ref().map(|r| r.path.as_str()), Some("/run/rootfs"));
        assert!(s.linux().new_namespace("pid"));
        assert!(!s.linux().new_namespace("network"));
    }

    fn refused(v: serde_json::Value, needle: &str) {
        match parse(&v) {
            Err(AgentError::InvalidArgument(m)) => assert!(m.contains(needle), "{needle:?} not in {m:?}"),
            other => panic!("expected InvalidArgument with {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn unsupported_fields_are_named() {
        let mut v = minimal();
        v["linux"]["intelRdt"] = serde_json::json!({"closID": "x"});
        refused(v, "spec.linux.intelRdt");
        let mut v = minimal();
        v["process"]["scheduler"] = serde_json::json!({"policy": "SCHED_FIFO"});
        refused(v, "spec.process.scheduler");
        let mut v = minimal();
        v["linux"]["namespaces"] = serde_json::json!([{"type": "mount"}, {"type": "user"}]);
        refused(v, "\"user\" is not supported");
        let mut v = minimal();
        v["linux"]["namespaces"] = serde_json::json!([{"type": "pid"}]);
        refused(v, "mount namespace");
        let mut v = minimal();
        v["linux"]["resources"] = serde_json::json!({"hugepageLimits": [{"pageSize": "2MB", "limit": 1}]});
        refused(v, "resources.hugepageLimits");
        let mut v = minimal();
        v["linux"]["uidMappings"] = serde_json::json!([{"containerID": 0, "hostID": 1000, "size": 1}]);
        refused(v, "user namespaces");
        let mut v = minimal();
        v["hooks"] = serde_json::json!({"prestart": [{"path": "/bin/true"}]});
        refused(v, "hooks");
    }

    #[test]
    fn ignorable_fields_are_accepted() {
        let mut v = minimal();
        v["annotations"] = serde_json::json!({"a": "b"});
        v["process"]["apparmorProfile"] = serde_json::json!("docker-default");
        v["linux"]["cgroupsPath"] = serde_json::json!("/docker/x");
        v["linux"]["resources"] = serde_json::json!({"devices": [{"allow": false, "access": "rwm"}]});
        v["hooks"] = serde_json::json!({});
        parse(&v).expect("accepted");
    }

    #[test]
    fn bad_process_fields_are_named() {
        let mut v = minimal();
        v["process"]["args"] = serde_json::json!([]);
        refused(v, "args must name a program");
        let mut v = minimal();
        v["process"]["cwd"] = serde_json::json!("rel");
        refused(v, "cwd");
        let mut v = minimal();
        v["process"]["capabilities"] = serde_json::json!({"bounding": ["CAP_FLY"]});
        refused(v, "CAP_FLY");
        let mut v = minimal();
        v["process"]["rlimits"] = serde_json::json!([{"type": "RLIMIT_NOPE", "hard": 1, "soft": 1}]);
        refused(v, "RLIMIT_NOPE");
        let mut v = minimal();
        v["process"]["env"] = serde_json::json!(["NOEQUALS"]);
        refused(v, "NOEQUALS");
        let mut v = minimal();
        v["root"]["path"] = serde_json::json!("relative");
        refused(v, "root.path");
        refused(serde_json::json!({"root": 3}), "spec is not valid");
    }

    #[test]
    fn sysctl_keys_stay_in_proc_sys() {
        assert_eq!(sysctl_path("net.ipv4.ip_forward"), Ok("/proc/sys/net/ipv4/ip_forward".into()));
        assert!(sysctl_path("net..x").is_err());
        assert!(sysctl_path("../../etc/passwd").is_err());
        assert!(sysctl_path("kernel/../x").is_err());
    }

    #[test]
    fn exec_process_parses() {
        let p = parse_process(br#"{"args":["ls"],"cwd":"/","terminal":true,"consoleSize":{"height":10,"width":20}}"#)
            .expect("valid");
        assert!(p.terminal);
        assert_eq!(p.console_size.map(|c| (c.height, c.width)), Some((10, 20)));
        assert!(parse_process(b"{\"args\":[\"ls\"]}").is_err(), "no cwd");
    }
}
