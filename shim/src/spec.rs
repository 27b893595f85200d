//! The OCI runtime spec (config.json) for a container in the guest, built from the
//! image's config and the run's options, Docker's defaults where the user said nothing,
//! and moat's default seccomp profile (`seccomp.rs`) unless the host config turned it
//! off.

use std::path::Path;

use serde_json::{json, Value};

use crate::image::ImageConfig;
use crate::user::{resolve_user, UserError};

/// PATH when neither the image nor the user sets one (Docker's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// RLIMIT_NOFILE of container processes (soft and hard), as Docker sets it.
pub const NOFILE_LIMIT: u64 = 1_048_576;

/// Docker's default capability set.
pub const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// A bind mount into the container, its source already a guest path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindMount {
    pub source: String,
    pub destination: String,
    pub read_only: bool,
}

/// What the user asked for on top of the image.
#[derive(Clone, Debug, Default)]
pub struct SpecOptions {
    /// The command; empty means the image's Entrypoint + Cmd.
    pub args: Vec<String>,
    /// `K=V` (or `K`, taken from moat's own environment if set there).
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub terminal: bool,
    pub read_only: bool,
    pub mounts: Vec<BindMount>,
    pub pids_limit: Option<i64>,
    pub hostname: String,
    pub no_new_privileges: bool,
    /// Give the container moat's default seccomp profile (the host config's
    /// `default_seccomp`).
    pub default_seccomp: bool,
}

/// Why a spec could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("no command: give one after the image, or use an image with an Entrypoint or Cmd")]
    NoCommand,
    #[error(transparent)]
    User(#[from] UserError),
    #[error("invalid environment variable {0:?}: want KEY=VALUE with a non-empty KEY")]
    Env(String),
    #[error("working directory {0:?} is not absolute")]
    Workdir(String),
    #[error("mount destination {0:?} is not absolute")]
    MountDestination(String),
    #[error("--pids-limit must be positive, got {0}")]
    PidsLimit(i64),
}

/// The process's argv: the command line if given (after the entrypoint, as Docker
/// does), else Entrypoint + Cmd.
pub fn process_args(image: &ImageConfig, cmd: &[String]) -> Result<Vec<String>, SpecError> {
    let mut args: Vec<String> = image.entrypoint.clone().unwrap_or_default();
    if cmd.is_empty() {
        args.extend(image.cmd.clone().unwrap_or_default());
    } else {
        args.extend(cmd.iter().cloned());
    }
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(args)
}

/// Merges environments: later entries replace earlier ones with the same key.
fn merge_env(base: &[String], extra: &[String], host: impl Fn(&str) -> Option<String>) -> Result<Vec<String>, SpecError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: String| match out.iter_mut().find(|(key, _)| key == k) {
        Some(slot) => slot.1 = v,
        None => out.push((k.to_string(), v)),
    };
    for e in base {
        if let Some((k, v)) = e.split_once('=') {
            set(k, v.to_string());
        }
    }
    for e in extra {
        if e.contains('\0') {
            return Err(SpecError::Env(e.clone()));
        }
        match e.split_once('=') {
            Some(("", _)) => return Err(SpecError::Env(e.clone())),
            Some((k, v)) => set(k, v.to_string()),
            None if e.is_empty() => return Err(SpecError::Env(e.clone())),
            None => {
                if let Some(v) = host(e) {
                    set(e, v);
                }
            }
        }
    }
    Ok(out.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

fn has_key(env: &[String], key: &str) -> bool {
    env.iter().any(|e| e.split_once('=').is_some_and(|(k, _)| k == key))
}

/// Builds the spec. `rootfs` is the root on the host (for /etc/passwd lookups),
/// `guest_root` where the agent finds it in the guest.
pub fn build(image: &ImageConfig, rootfs: &Path, guest_root: &str, opts: &SpecOptions) -> Result<Value, SpecError> {
    let args = process_args(image, &opts.args)?;
    let user_spec = opts.user.clone().or_else(|| image.user.clone()).unwrap_or_default();
    let user = resolve_user(rootfs, &user_spec)?;
    let mut env = merge_env(image.env.as_deref().unwrap_or_default(), &opts.env, |k| std::env::var(k).ok())?;
    if !has_key(&env, "PATH") {
        env.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    if !has_key(&env, "HOSTNAME") && !opts.hostname.is_empty() {
        env.push(format!("HOSTNAME={}", opts.hostname));
    }
    if !has_key(&env, "HOME") {
        env.push(format!("HOME={}", user.home));
    }
    if opts.terminal && !has_key(&env, "TERM") {
        env.push("TERM=xterm".into());
    }
    let cwd = opts.workdir.clone().or_else(|| image.working_dir.clone().filter(|w| !w.is_empty())).unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        return Err(SpecError::Workdir(cwd));
    }
    if let Some(n) = opts.pids_limit {
        if n <= 0 {
            return Err(SpecError::PidsLimit(n));
        }
    }
    let caps: Vec<&str> = DEFAULT_CAPS.to_vec();
    let mut mounts = default_mounts();
    for m in &opts.mounts {
        if !m.destination.starts_with('/') {
            return Err(SpecError::MountDestination(m.destination.clone()));
        }
        let mut options = vec!["rbind", "rprivate"];
        if m.read_only {
            options.push("ro");
        }
        mounts.push(json!({"destination": m.destination, "type": "bind", "source": m.source, "options": options}));
    }
    let mut linux = json!({
        // No network namespace: the guest has no NIC and the VM is the boundary. A
        // cgroup namespace, as Docker on cgroup v2: /sys/fs/cgroup is the container's own.
        "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
        "maskedPaths": [
            "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
            "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
            "/sys/firmware", "/sys/devices/virtual/powercap"
        ],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        "resources": {}
    });
    if let Some(n) = opts.pids_limit {
        linux["resources"]["pids"] = json!({"limit": n});
    }
    let mut spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": opts.terminal,
            "user": {"uid": user.uid, "gid": user.gid, "additionalGids": user.additional_gids},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": NOFILE_LIMIT, "soft": NOFILE_LIMIT}],
            "noNewPrivileges": opts.no_new_privileges
        },
        "root": {"path": guest_root, "readonly": opts.read_only},
        "hostname": opts.hostname,
        "mounts": mounts,
        "linux": linux
    });
    crate::seccomp::apply_default(&mut spec, opts.default_seccomp);
    Ok(spec)
}

/// The kernel filesystems every container gets (runc's and Docker's defaults).
fn default_mounts() -> Vec<Value> {
    vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup2", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: None,
            cmd: Some(vec!["sh".into()]),
            env: Some(vec!["PATH=/bin".into(), "A=1".into()]),
            working_dir: Some("/w".into()),
            user: None,
        }
    }

    fn rootfs() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(t.path().join("etc")).expect("etc");
        std::fs::write(t.path().join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nu:x:7:8::/home/u:/bin/sh\n").expect("passwd");
        std::fs::write(t.path().join("etc/group"), "g:x:8:\nextra:x:9:u\n").expect("group");
        t
    }

    fn opts() -> SpecOptions {
        SpecOptions { hostname: "box".into(), ..Default::default() }
    }

    #[test]
    fn args_from_command_line_entrypoint_and_cmd() {
        let mut img = image();
        assert_eq!(process_args(&img, &[]).expect("cmd"), vec!["sh"]);
        assert_eq!(process_args(&img, &["ls".into()]).expect("override"), vec!["ls"]);
        img.entrypoint = Some(vec!["/init".into()]);
        assert_eq!(process_args(&img, &[]).expect("ep+cmd"), vec!["/init", "sh"]);
        assert_eq!(process_args(&img, &["x".into()]).expect("ep+args"), vec!["/init", "x"]);
        let e = process_args(&ImageConfig::default(), &[]).expect_err("nothing");
        assert!(e.to_string().starts_with("no command"), "{e}");
    }

    #[test]
    fn defaults_look_like_docker() {
        let r = rootfs();
        let s = build(&image(), r.path(), "/run/moat/shared/rootfs", &opts()).expect("spec");
        let p = &s["process"];
        assert_eq!(p["args"], json!(["sh"]));
        assert_eq!(p["cwd"], "/w");
        assert_eq!(p["user"], json!({"uid": 0, "gid": 0, "additionalGids": []}));
        assert_eq!(p["env"], json!(["PATH=/bin", "A=1", "HOSTNAME=box", "HOME=/root"]));
        assert_eq!(p["terminal"], false);
        assert_eq!(p["noNewPrivileges"], false);
        assert_eq!(p["capabilities"]["bounding"].as_array().expect("caps").len(), DEFAULT_CAPS.len());
        assert_eq!(p["rlimits"][0]["type"], "RLIMIT_NOFILE");
        assert_eq!(s["root"], json!({"path": "/run/moat/shared/rootfs", "readonly": false}));
        assert_eq!(s["hostname"], "box");
        let ns: Vec<&str> = s["linux"]["namespaces"].as_array().expect("ns").iter().map(|n| n["type"].as_str().expect("type")).collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount", "cgroup"]);
        let dests: Vec<&str> = s["mounts"].as_array().expect("mounts").iter().map(|m| m["destination"].as_str().expect("dest")).collect();
        assert_eq!(dests, ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup"]);
        assert!(s["linux"]["resources"].get("pids").is_none());
        assert!(s["linux"].get("seccomp").is_none(), "default_seccomp is off in these options");
    }

    #[test]
    fn moat_run_gets_the_default_seccomp_profile_unless_turned_off() {
        let r = rootfs();
        let s = build(&image(), r.path(), "/g", &SpecOptions { default_seccomp: true, ..opts() }).expect("spec");
        assert_eq!(s["linux"]["seccomp"], crate::seccomp::default_profile(DEFAULT_CAPS));
        let s = build(&image(), r.path(), "/g", &SpecOptions { default_seccomp: false, ..opts() }).expect("spec");
        assert!(s["linux"].get("seccomp").is_none());
    }

    #[test]
    fn options_override_the_image() {
        let r = rootfs();
        let o = SpecOptions {
            args: vec!["id".into()],
            env: vec!["A=2".into(), "B=x=y".into(), "MOAT_SPEC_TEST_UNSET".into()],
            workdir: Some("/tmp".into()),
            user: Some("u".into()),
            terminal: true,
            read_only: true,
            mounts: vec![BindMount { source: "/run/moat/shared/vol/0".into(), destination: "/data".into(), read_only: true }],
            pids_limit: Some(64),
            hostname: "h".into(),
            no_new_privileges: true,
            default_seccomp: false,
        };
        let s = build(&image(), r.path(), "/g", &o).expect("spec");
        let p = &s["process"];
        assert_eq!(p["args"], json!(["id"]));
        assert_eq!(p["cwd"], "/tmp");
        assert_eq!(p["user"], json!({"uid": 7, "gid": 8, "additionalGids": [8, 9]}));
        assert_eq!(p["env"], json!(["PATH=/bin", "A=2", "B=x=y", "HOSTNAME=h", "HOME=/home/u", "TERM=xterm"]));
        assert_eq!(p["terminal"], true);
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(s["root"]["readonly"], true);
        assert_eq!(s["linux"]["resources"]["pids"]["limit"], 64);
        let last = s["mounts"].as_array().expect("mounts").last().expect("bind").clone();
        assert_eq!(last, json!({"destination": "/data", "type": "bind", "source": "/run/moat/shared/vol/0", "options": ["rbind", "rprivate", "ro"]}));
    }

    #[test]
    fn path_defaults_and_bad_options() {
        let r = rootfs();
        let img = ImageConfig { cmd: Some(vec!["x".into()]), ..Default::default() };
        let s = build(&img, r.path(), "/g", &opts()).expect("spec");
        assert_eq!(s["process"]["env"][0], format!("PATH={DEFAULT_PATH}"));
        assert_eq!(s["process"]["cwd"], "/");
        let bad = |o: SpecOptions| build(&img, r.path(), "/g", &o).expect_err("bad").to_string();
        assert!(bad(SpecOptions { env: vec!["=x".into()], ..opts() }).contains("invalid environment variable"));
        assert!(bad(SpecOptions { workdir: Some("rel".into()), ..opts() }).contains("not absolute"));
        assert!(bad(SpecOptions { pids_limit: Some(0), ..opts() }).contains("--pids-limit"));
        assert!(bad(SpecOptions { user: Some("nobody".into()), ..opts() }).contains("unknown user \"nobody\""));
        let m = BindMount { source: "/s".into(), destination: "data".into(), read_only: false };
        assert!(bad(SpecOptions { mounts: vec![m], ..opts() }).contains("mount destination"));
    }
}
