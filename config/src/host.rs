//! The host's moat configuration: `/etc/moat/config.toml` (or `$MOAT_CONFIG`).
//!
//! Every key has a default and none is required; an unknown key is an error that
//! names the key, so a typo never silently falls back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the config file is read from unless `MOAT_CONFIG` names another.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/moat/config.toml";
/// The environment variable that overrides [`DEFAULT_CONFIG_PATH`].
pub const CONFIG_ENV: &str = "MOAT_CONFIG";
pub const DEFAULT_STATE_DIR: &str = "/run/moat";
pub const DEFAULT_IMAGE_DIR: &str = "/var/lib/moat/images";
/// Writable layers of `moat run` (sparse disk images): on disk, never on a tmpfs.
pub const DEFAULT_DISK_DIR: &str = "/var/lib/moat/scratch";
/// A container's writable layer unless a run asks for another size.
pub const DEFAULT_DISK_MIB: u32 = 10 * 1024;
/// The largest writable layer a run may ask for.
pub const DEFAULT_MAX_DISK_MIB: u32 = 64 * 1024;
/// The smallest writable layer that holds an ext4 file system worth having.
pub const MIN_DISK_MIB: u32 = 16;
/// The unprivileged uid and gid moat-vmm runs as: a number no distribution, no
/// subordinate-id range (useradd's end at 600100000) and no login uses.
pub const DEFAULT_JAIL_ID: u32 = 1_000_000_000;
/// Where `moat run` puts each run's host cgroup, below the cgroup v2 root.
pub const DEFAULT_CGROUP_PARENT: &str = "/moat";
pub const DEFAULT_HOST_VCPUS: u8 = 1;
pub const DEFAULT_HOST_MEMORY_MIB: u32 = 256;
/// How long a microVM may take from the VMM's start to its agent answering.
pub const DEFAULT_BOOT_TIMEOUT_SECS: u32 = 120;
const MAX_BOOT_TIMEOUT_SECS: u64 = 3600;
/// Most MiB the image cache holds by default: room for a handful of large images.
pub const DEFAULT_IMAGE_CACHE_MIB: u64 = 20 * 1024;

/// The host-wide settings of moat's runtime (`moat`, containerd-shim-moat-v2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoatConfig {
    /// The moat-vmm binary.
    pub vmm: PathBuf,
    /// The guest kernel (vmlinux).
    pub kernel: PathBuf,
    /// The guest initramfs holding moat-agent.
    pub initrd: PathBuf,
    /// The virtio-fs backend (vhost-user) binary.
    pub virtiofsd: PathBuf,
    /// vCPUs of a sandbox unless the run asks for another number.
    pub vcpus: u8,
    /// Guest RAM in MiB unless the run asks for another size.
    pub memory_mib: u32,
    /// Per-sandbox state (`<state_dir>/<id>/`).
    pub state_dir: PathBuf,
    /// Unpacked images, keyed by their config digest.
    pub image_dir: PathBuf,
    /// Seconds a microVM may take to boot to its agent before the start fails.
    pub boot_timeout_secs: u32,
    /// Where `moat run` keeps its writable layers (sparse disk images).
    pub disk_dir: PathBuf,
    /// A container's writable layer (MiB) unless a run asks for another size.
    pub disk_mib: u32,
    /// The largest writable layer a run may ask for (MiB).
    pub max_disk_mib: u32,
    /// Run moat-vmm jailed (unprivileged ids, own namespaces, pivot_root).
    pub jail: bool,
    /// The uid moat-vmm runs as when jailed.
    pub jail_uid: u32,
    /// The gid moat-vmm runs as when jailed.
    pub jail_gid: u32,
    /// The cgroup (below the cgroup v2 root) under which `moat run` makes one per run.
    pub cgroup_parent: PathBuf,
    /// The most vCPUs one microVM may have (`max_vcpus`).
    pub max_vcpus: Limit,
    /// The most guest RAM in MiB one microVM may have (`max_memory_mib`).
    pub max_memory_mib: Limit,
    /// Most MiB the image cache may hold before `moat run` evicts unused images; 0 is
    /// no limit.
    pub image_cache_mib: u64,
    /// Give a container whose spec has no seccomp profile moat's default one (unless
    /// the container is privileged).
    pub default_seccomp: bool,
}

/// What an operator allows one microVM to ask for, and where that figure comes from,
/// so that a refusal can say which setting to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    /// The config key that sets it (`max_vcpus`, `max_memory_mib`).
    pub key: &'static str,
    pub value: u32,
    pub origin: LimitOrigin,
}

/// Where a [`Limit`]'s value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LimitOrigin {
    /// The key is 0 or absent: the host's own figure (`what` names it).
    Host { what: &'static str },
    /// Set in this config file.
    File(PathBuf),
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.origin {
            LimitOrigin::Host { what } => {
                write!(f, "{}={} ({what}: {} is 0 or unset in the moat config)", self.key, self.value, self.key)
            }
            LimitOrigin::File(path) => write!(f, "{}={} (set in {})", self.key, self.value, path.display()),
        }
    }
}

/// A request above an operator's [`Limit`].
#[derive(Debug, thiserror::Error)]
#[error("{what}={got} is above the host's limit {limit}")]
pub struct AboveLimit {
    /// What asked: an annotation or a flag.
    pub what: String,
    pub got: u64,
    pub limit: Limit,
}

impl Limit {
    /// Checks a request (`what` names where it comes from, e.g. `io.moat.vcpus` or
    /// `--vcpus`) against the limit.
    pub fn check(&self, what: &str, got: u64) -> Result<(), AboveLimit> {
        if got > u64::from(self.value) {
            return Err(AboveLimit { what: what.to_string(), got, limit: self.clone() });
        }
        Ok(())
    }
}

/// The host's own figures, the limits that `max_vcpus = 0` and `max_memory_mib = 0`
/// stand for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostResources {
    /// Online CPUs.
    pub cpus: u32,
    /// MemTotal, in MiB.
    pub memory_mib: u32,
}

impl HostResources {
    /// This host's online CPU count and MemTotal, each capped at what one VM can have
    /// at all ([`crate::MAX_VCPUS`], [`crate::MAX_MEMORY_MIB`]). A figure the kernel
    /// does not give falls back to that cap.
    pub fn detect() -> HostResources {
        let cpus = nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN)
            .ok()
            .flatten()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
            .unwrap_or(u32::from(crate::MAX_VCPUS));
        let memory_mib = nix::sys::sysinfo::sysinfo()
            .ok()
            .and_then(|i| u32::try_from(i.ram_total() >> 20).ok())
            .filter(|n| *n > 0)
            .unwrap_or(crate::MAX_MEMORY_MIB);
        HostResources {
            cpus: cpus.min(u32::from(crate::MAX_VCPUS)),
            memory_mib: memory_mib.min(crate::MAX_MEMORY_MIB),
        }
    }

    fn vcpu_limit(&self) -> Limit {
        Limit { key: "max_vcpus", value: self.cpus, origin: LimitOrigin::Host { what: "this host's online CPUs" } }
    }

    fn memory_limit(&self) -> Limit {
        Limit { key: "max_memory_mib", value: self.memory_mib, origin: LimitOrigin::Host { what: "this host's MemTotal" } }
    }
}

/// The file's shape: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
struct ConfigFile {
    vmm: Option<PathBuf>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    virtiofsd: Option<PathBuf>,
    vcpus: Option<u64>,
    memory_mib: Option<u64>,
    state_dir: Option<PathBuf>,
    image_dir: Option<PathBuf>,
    boot_timeout_secs: Option<u64>,
    disk_dir: Option<PathBuf>,
    disk_mib: Option<u64>,
    max_disk_mib: Option<u64>,
    jail: Option<bool>,
    jail_uid: Option<u32>,
    jail_gid: Option<u32>,
    cgroup_parent: Option<PathBuf>,
    max_vcpus: Option<u64>,
    max_memory_mib: Option<u64>,
    image_cache_mib: Option<u64>,
    default_seccomp: Option<bool>,
}

/// Why the host config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum HostConfigError {
    #[error("cannot read moat config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("moat config {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("moat config {path}: {message}")]
    Value { path: PathBuf, message: String },
}

impl MoatConfig {
    /// The defaults, with the install-relative paths taken from `prefix_bin`, the
    /// directory holding the running binary (`<prefix>/bin`). The guest image is
    /// `<prefix>/share/moat/`, or, in a build tree (`build/bin` beside `build/guest`
    /// holding the image while `share/moat` does not), `build/guest/`.
    pub fn defaults(prefix_bin: &Path) -> MoatConfig {
        MoatConfig::defaults_on(prefix_bin, HostResources::detect())
    }

    /// [`MoatConfig::defaults`] for a host with `host`'s CPUs and memory.
    pub fn defaults_on(prefix_bin: &Path, host: HostResources) -> MoatConfig {
        let mut share = normalize(&prefix_bin.join("..").join("share").join("moat"));
        let build_tree = normalize(&prefix_bin.join("..").join("guest"));
        if !share.join("vmlinux").exists() && build_tree.join("vmlinux").exists() {
            share = build_tree;
        }
        // virtiofsd: installed in <prefix>/libexec/moat; in a build tree, beside moat.
        let mut virtiofsd = normalize(&prefix_bin.join("..").join("libexec").join("moat").join("virtiofsd"));
        if !virtiofsd.exists() && prefix_bin.join("virtiofsd").exists() {
            virtiofsd = prefix_bin.join("virtiofsd");
        }
        MoatConfig {
            vmm: prefix_bin.join("moat-vmm"),
            kernel: share.join("vmlinux"),
            initrd: share.join("initramfs.cpio.gz"),
            virtiofsd,
            vcpus: DEFAULT_HOST_VCPUS,
            memory_mib: DEFAULT_HOST_MEMORY_MIB,
            state_dir: DEFAULT_STATE_DIR.into(),
            image_dir: DEFAULT_IMAGE_DIR.into(),
            boot_timeout_secs: DEFAULT_BOOT_TIMEOUT_SECS,
            disk_dir: DEFAULT_DISK_DIR.into(),
            disk_mib: DEFAULT_DISK_MIB,
            max_disk_mib: DEFAULT_MAX_DISK_MIB,
            jail: true,
            jail_uid: DEFAULT_JAIL_ID,
            jail_gid: DEFAULT_JAIL_ID,
            cgroup_parent: DEFAULT_CGROUP_PARENT.into(),
            max_vcpus: host.vcpu_limit(),
            max_memory_mib: host.memory_limit(),
            image_cache_mib: DEFAULT_IMAGE_CACHE_MIB,
            default_seccomp: true,
        }
    }

    /// Loads the config the running binary should use: `$MOAT_CONFIG` if set (it must
    /// exist), else [`DEFAULT_CONFIG_PATH`] if it exists, else the defaults.
    pub fn load() -> Result<MoatConfig, HostConfigError> {
        let bin_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.canonicalize().ok())
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("/usr/local/bin"));
        let defaults = MoatConfig::defaults(&normalize(&bin_dir));
        match MoatConfig::file() {
            Some(path) => MoatConfig::from_file(&path, defaults),
            None => Ok(defaults),
        }
    }

    /// The file [`MoatConfig::load`] reads: `$MOAT_CONFIG` if set, else
    /// [`DEFAULT_CONFIG_PATH`] if it exists; `None` means the built-in defaults.
    pub fn file() -> Option<PathBuf> {
        match std::env::var_os(CONFIG_ENV) {
            Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
            _ => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
        }
    }

    /// Reads `path` over `defaults`.
    pub fn from_file(path: &Path, defaults: MoatConfig) -> Result<MoatConfig, HostConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| HostConfigError::Read { path: path.to_path_buf(), source })?;
        MoatConfig::from_toml(path, &text, defaults)
    }

    /// Parses TOML text (`path` names it in errors and in the limits it sets) over
    /// `defaults`.
    pub fn from_toml(path: &Path, text: &str, defaults: MoatConfig) -> Result<MoatConfig, HostConfigError> {
        MoatConfig::from_toml_on(path, text, defaults, HostResources::detect())
    }

    /// [`MoatConfig::from_toml`] on a host with `host`'s CPUs and memory (what a
    /// maximum of 0 stands for).
    pub fn from_toml_on(path: &Path, text: &str, defaults: MoatConfig, host: HostResources) -> Result<MoatConfig, HostConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| HostConfigError::Parse {
            path: path.to_path_buf(),
            // toml's message names the unknown key and the line; keep it on one line.
            message: e.message().trim().to_string(),
        })?;
        let value_err = |message: String| HostConfigError::Value { path: path.to_path_buf(), message };
        let vcpus = match file.vcpus {
            Some(n) => crate::check_vcpus(n).map_err(|e| value_err(e.to_string()))?,
            None => defaults.vcpus,
        };
        let memory_mib = match file.memory_mib {
            Some(n) => crate::check_memory(n).map_err(|e| value_err(e.to_string()))?,
            None => defaults.memory_mib,
        };
        let boot_timeout_secs = match file.boot_timeout_secs {
            Some(n) if (1..=MAX_BOOT_TIMEOUT_SECS).contains(&n) => n as u32,
            Some(n) => return Err(value_err(format!("boot_timeout_secs must be between 1 and {MAX_BOOT_TIMEOUT_SECS}, got {n}"))),
            None => defaults.boot_timeout_secs,
        };
        let mib = |key: &str, v: Option<u64>, d: u32| -> Result<u32, HostConfigError> {
            match v {
                Some(n) if (u64::from(MIN_DISK_MIB)..=u64::from(u32::MAX)).contains(&n) => Ok(n as u32),
                Some(n) => Err(value_err(format!("{key} must be at least {MIN_DISK_MIB} (MiB), got {n}"))),
                None => Ok(d),
            }
        };
        let max_disk_mib = mib("max_disk_mib", file.max_disk_mib, defaults.max_disk_mib)?;
        let disk_mib = mib("disk_mib", file.disk_mib, defaults.disk_mib)?;
        if disk_mib > max_disk_mib {
            return Err(value_err(format!("disk_mib ({disk_mib}) is above max_disk_mib ({max_disk_mib})")));
        }
        let jail_uid = file.jail_uid.unwrap_or(defaults.jail_uid);
        let jail_gid = file.jail_gid.unwrap_or(defaults.jail_gid);
        if jail_uid == 0 || jail_gid == 0 || jail_uid == u32::MAX || jail_gid == u32::MAX {
            return Err(value_err(format!(
                "jail_uid and jail_gid must be unprivileged ids (not 0, not 4294967295), got {jail_uid}:{jail_gid}; set jail = false to run moat-vmm as root"
            )));
        }
        let set = |key: &'static str, value: u32| Limit { key, value, origin: LimitOrigin::File(path.to_path_buf()) };
        let max_vcpus = match file.max_vcpus {
            Some(0) => host.vcpu_limit(),
            Some(n) if n <= u64::from(crate::MAX_VCPUS) => set("max_vcpus", n as u32),
            Some(n) => return Err(value_err(format!("max_vcpus must be between 0 (this host's CPUs) and {}, got {n}", crate::MAX_VCPUS))),
            None => defaults.max_vcpus,
        };
        let max_memory_mib = match file.max_memory_mib {
            Some(0) => host.memory_limit(),
            Some(n) => set("max_memory_mib", crate::check_memory(n).map_err(|_| {
                value_err(format!(
                    "max_memory_mib must be 0 (this host's MemTotal) or between {} and {}, got {n}",
                    crate::MIN_MEMORY_MIB,
                    crate::MAX_MEMORY_MIB
                ))
            })?),
            None => defaults.max_memory_mib,
        };
        // The config's own defaults must be within its maximums, or every run that
        // takes them would fail.
        if u32::from(vcpus) > max_vcpus.value {
            return Err(value_err(format!("vcpus = {vcpus} is above the maximum {max_vcpus}")));
        }
        if memory_mib > max_memory_mib.value {
            return Err(value_err(format!("memory_mib = {memory_mib} is above the maximum {max_memory_mib}")));
        }
        let abs = |key: &str, v: Option<PathBuf>, d: PathBuf| -> Result<PathBuf, HostConfigError> {
            match v {
                Some(p) if p.is_absolute() => Ok(p),
                Some(p) => Err(value_err(format!("{key} must be an absolute path, got {}", p.display()))),
                None => Ok(d),
            }
        };
        Ok(MoatConfig {
            vmm: abs("vmm", file.vmm, defaults.vmm)?,
            kernel: abs("kernel", file.kernel, defaults.kernel)?,
            initrd: abs("initrd", file.initrd, defaults.initrd)?,
            virtiofsd: abs("virtiofsd", file.virtiofsd, defaults.virtiofsd)?,
            vcpus,
            memory_mib,
            state_dir: abs("state_dir", file.state_dir, defaults.state_dir)?,
            image_dir: abs("image_dir", file.image_dir, defaults.image_dir)?,
            boot_timeout_secs,
            disk_dir: abs("disk_dir", file.disk_dir, defaults.disk_dir)?,
            disk_mib,
            max_disk_mib,
            jail: file.jail.unwrap_or(defaults.jail),
            jail_uid,
            jail_gid,
            cgroup_parent: abs("cgroup_parent", file.cgroup_parent, defaults.cgroup_parent)?,
            max_vcpus,
            max_memory_mib,
            image_cache_mib: file.image_cache_mib.unwrap_or(defaults.image_cache_mib),
            default_seccomp: file.default_seccomp.unwrap_or(defaults.default_seccomp),
        })
    }
}

/// Drops `.` and resolves `..` lexically, so `<bin>/../share/moat` prints cleanly.
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host with 8 CPUs and 16 GiB, so that the tests do not depend on this one.
    const HOST: HostResources = HostResources { cpus: 8, memory_mib: 16384 };

    fn defaults() -> MoatConfig {
        MoatConfig::defaults_on(Path::new("/opt/moat/bin"), HOST)
    }

    fn parse(text: &str) -> Result<MoatConfig, HostConfigError> {
        MoatConfig::from_toml_on(Path::new("/etc/moat/config.toml"), text, defaults(), HOST)
    }

    #[test]
    fn defaults_follow_the_install_prefix() {
        let d = defaults();
        assert_eq!(d.vmm, Path::new("/opt/moat/bin/moat-vmm"));
        assert_eq!(d.kernel, Path::new("/opt/moat/share/moat/vmlinux"));
        assert_eq!(d.initrd, Path::new("/opt/moat/share/moat/initramfs.cpio.gz"));
        assert_eq!(d.virtiofsd, Path::new("/opt/moat/libexec/moat/virtiofsd"));
        assert_eq!(d.disk_dir, Path::new("/var/lib/moat/scratch"));
        assert_eq!((d.disk_mib, d.max_disk_mib), (10240, 65536));
        assert!(d.jail);
        assert_eq!((d.jail_uid, d.jail_gid), (1_000_000_000, 1_000_000_000));
        assert_eq!((d.vcpus, d.memory_mib), (1, 256));
        assert_eq!(d.state_dir, Path::new("/run/moat"));
        assert_eq!(d.image_dir, Path::new("/var/lib/moat/images"));
    }

    #[test]
    fn a_build_tree_finds_its_guest_beside_bin() {
        let dir = std::env::temp_dir().join(format!("moat-host-config-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bin")).expect("bin");
        std::fs::create_dir_all(dir.join("guest")).expect("guest");
        assert_eq!(MoatConfig::defaults(&dir.join("bin")).kernel, dir.join("share/moat/vmlinux"), "no image anywhere");
        std::fs::write(dir.join("guest/vmlinux"), b"k").expect("kernel");
        let d = MoatConfig::defaults(&dir.join("bin"));
        assert_eq!((d.kernel, d.initrd), (dir.join("guest/vmlinux"), dir.join("guest/initramfs.cpio.gz")));
        std::fs::create_dir_all(dir.join("share/moat")).expect("share");
        std::fs::write(dir.join("share/moat/vmlinux"), b"k").expect("installed kernel");
        assert_eq!(MoatConfig::defaults(&dir.join("bin")).kernel, dir.join("share/moat/vmlinux"), "an install wins");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").expect("empty"), defaults());
        assert_eq!(parse("# nothing\n").expect("comment"), defaults());
    }

    #[test]
    fn every_key_can_be_set() {
        let c = parse(
            r#"
            vmm = "/x/moat-vmm"
            kernel = "/x/vmlinux"
            initrd = "/x/initrd"
            virtiofsd = "/x/virtiofsd"
            vcpus = 4
            memory_mib = 2048
            state_dir = "/x/run"
            image_dir = "/x/images"
            max_vcpus = 4
            max_memory_mib = 4096
            image_cache_mib = 0
            "#,
        )
        .expect("full config");
        assert_eq!(c.vmm, Path::new("/x/moat-vmm"));
        assert_eq!(c.kernel, Path::new("/x/vmlinux"));
        assert_eq!(c.initrd, Path::new("/x/initrd"));
        assert_eq!(c.virtiofsd, Path::new("/x/virtiofsd"));
        assert_eq!((c.vcpus, c.memory_mib), (4, 2048));
        assert_eq!(c.state_dir, Path::new("/x/run"));
        assert_eq!(c.image_dir, Path::new("/x/images"));
        let file = LimitOrigin::File("/etc/moat/config.toml".into());
        assert_eq!(c.max_vcpus, Limit { key: "max_vcpus", value: 4, origin: file.clone() });
        assert_eq!(c.max_memory_mib, Limit { key: "max_memory_mib", value: 4096, origin: file });
        assert_eq!(c.image_cache_mib, 0);
    }

    #[test]
    fn maximums_default_to_the_hosts_own() {
        let d = defaults();
        assert_eq!(d.image_cache_mib, DEFAULT_IMAGE_CACHE_MIB);
        for c in [d, parse("max_vcpus = 0\nmax_memory_mib = 0").expect("0 is the host's")] {
            assert_eq!(c.max_vcpus.value, 8);
            assert_eq!(c.max_memory_mib.value, 16384);
            assert!(matches!(c.max_vcpus.origin, LimitOrigin::Host { .. }));
            assert!(matches!(c.max_memory_mib.origin, LimitOrigin::Host { .. }));
        }
        // The real host's figures are real ones, within what one VM can have.
        let h = HostResources::detect();
        assert!((1..=u32::from(crate::MAX_VCPUS)).contains(&h.cpus), "{h:?}");
        assert!((1..=crate::MAX_MEMORY_MIB).contains(&h.memory_mib), "{h:?}");
        // A host with more than one VM can have is capped there.
        let big = HostResources { cpus: 64, memory_mib: crate::MAX_MEMORY_MIB };
        assert_eq!(MoatConfig::defaults_on(Path::new("/b"), big).max_vcpus.value, 64);
    }

    #[test]
    fn a_default_above_its_maximum_names_both_keys() {
        let e = parse("vcpus = 4\nmax_vcpus = 2").expect_err("vcpus above max_vcpus").to_string();
        assert_eq!(e, "moat config /etc/moat/config.toml: vcpus = 4 is above the maximum max_vcpus=2 (set in /etc/moat/config.toml)");
        let e = parse("memory_mib = 2048\nmax_memory_mib = 1024").expect_err("memory above max").to_string();
        assert!(e.contains("memory_mib = 2048") && e.contains("max_memory_mib=1024"), "{e}");
        // Against the host's own figures when the maximum is 0 or unset.
        let e = parse("vcpus = 9").expect_err("above the host's CPUs").to_string();
        assert!(e.contains("vcpus = 9 is above the maximum max_vcpus=8 (this host's online CPUs"), "{e}");
        let e = parse("memory_mib = 20000\nmax_memory_mib = 0").expect_err("above MemTotal").to_string();
        assert!(e.contains("max_memory_mib=16384 (this host's MemTotal"), "{e}");
        // Equal is fine, and a maximum may exceed the host (an operator's choice).
        let c = parse("vcpus = 2\nmax_vcpus = 2\nmemory_mib = 512\nmax_memory_mib = 65536").expect("at the maximum");
        assert_eq!((c.vcpus, c.max_vcpus.value, c.max_memory_mib.value), (2, 2, 65536));
    }

    #[test]
    fn maximums_are_bounded() {
        for bad in ["max_vcpus = 65", "max_memory_mib = 16", "max_memory_mib = 262145"] {
            let e = parse(bad).expect_err(bad).to_string();
            assert!(e.contains(&format!("{} must be", bad.split(' ').next().unwrap_or_default())), "{bad}: {e}");
        }
        assert!(parse("max_vcpus = -1").is_err());
    }

    #[test]
    fn requests_above_a_limit_name_it_and_its_origin() {
        let c = parse("max_vcpus = 8").expect("max_vcpus");
        c.max_vcpus.check("io.moat.vcpus", 8).expect("at the limit");
        let e = c.max_vcpus.check("io.moat.vcpus", 32).expect_err("above");
        assert_eq!(e.to_string(), "io.moat.vcpus=32 is above the host's limit max_vcpus=8 (set in /etc/moat/config.toml)");
        let e = defaults().max_memory_mib.check("--memory", 16385).expect_err("above MemTotal");
        assert_eq!(
            e.to_string(),
            "--memory=16385 is above the host's limit max_memory_mib=16384 (this host's MemTotal: max_memory_mib is 0 or unset in the moat config)"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("vcpu = 2\n").expect_err("typo");
        let msg = e.to_string();
        assert!(msg.contains("vcpu") && msg.contains("/etc/moat/config.toml"), "{msg}");
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse("vcpus = 0").expect_err("0 vcpus").to_string().contains("vcpus must be between"));
        assert!(parse("memory_mib = 1").expect_err("1 MiB").to_string().contains("memory_mib"));
        assert!(parse("vcpus = \"two\"").is_err());
        let e = parse("kernel = \"vmlinux\"").expect_err("relative path");
        assert!(e.to_string().contains("kernel must be an absolute path"), "{e}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = MoatConfig::from_file(Path::new("/nonexistent/moat.toml"), defaults()).expect_err("missing");
        assert_eq!(e.to_string(), "cannot read moat config /nonexistent/moat.toml");
    }

    /// The example installed as /etc/moat/config.toml by `make install`.
    const EXAMPLE: &str = include_str!("../moat.toml.example");

    #[test]
    fn the_installed_example_is_all_defaults() {
        let prefix_bin = Path::new("/usr/local/bin");
        let d = MoatConfig::defaults_on(prefix_bin, HOST);
        let path = Path::new("moat.toml.example");
        assert_eq!(MoatConfig::from_toml_on(path, EXAMPLE, d.clone(), HOST).expect("as shipped"), d);
        // Uncommented, every key must state its default: parsed over values that all
        // differ from the defaults, it must give the defaults back.
        let uncommented: String = EXAMPLE
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(kv) if kv.contains(" = ") => kv,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(uncommented.lines().filter(|l| l.contains(" = ") && !l.starts_with('#')).count() >= 13, "{uncommented}");
        let file = LimitOrigin::File(path.into());
        let other = MoatConfig {
            vmm: "/x/vmm".into(),
            kernel: "/x/kernel".into(),
            initrd: "/x/initrd".into(),
            virtiofsd: "/x/virtiofsd".into(),
            vcpus: d.vcpus + 1,
            memory_mib: d.memory_mib + 1,
            state_dir: "/x/state".into(),
            image_dir: "/x/images".into(),
            boot_timeout_secs: d.boot_timeout_secs + 1,
            disk_dir: "/x/scratch".into(),
            disk_mib: d.disk_mib + 1,
            max_disk_mib: d.max_disk_mib + 1,
            jail: !d.jail,
            jail_uid: d.jail_uid + 1,
            jail_gid: d.jail_gid + 1,
            cgroup_parent: "/x".into(),
            max_vcpus: Limit { key: "max_vcpus", value: 3, origin: file.clone() },
            max_memory_mib: Limit { key: "max_memory_mib", value: 999, origin: file },
            image_cache_mib: d.image_cache_mib + 1,
            default_seccomp: !d.default_seccomp,
        };
        assert_eq!(MoatConfig::from_toml_on(path, &uncommented, other, HOST).expect("uncommented"), d);
    }

    #[test]
    fn boot_timeout_is_bounded() {
        assert_eq!(parse("boot_timeout_secs = 900").expect("900").boot_timeout_secs, 900);
        for bad in ["boot_timeout_secs = 0", "boot_timeout_secs = 3601"] {
            let e = parse(bad).expect_err(bad).to_string();
            assert!(e.contains("boot_timeout_secs must be between 1 and 3600"), "{e}");
        }
    }

    #[test]
    fn disk_sizes_and_jail_ids_are_checked() {
        let c = parse("disk_mib = 2048\nmax_disk_mib = 4096\njail_uid = 5000\njail_gid = 5001\njail = false").expect("valid");
        assert_eq!((c.disk_mib, c.max_disk_mib, c.jail_uid, c.jail_gid, c.jail), (2048, 4096, 5000, 5001, false));
        let e = parse("disk_mib = 8192\nmax_disk_mib = 4096").expect_err("above max").to_string();
        assert!(e.contains("disk_mib (8192) is above max_disk_mib (4096)"), "{e}");
        assert!(parse("disk_mib = 1").expect_err("tiny").to_string().contains("disk_mib must be at least 16"));
        let e = parse("jail_uid = 0").expect_err("root").to_string();
        assert!(e.contains("jail_uid and jail_gid must be unprivileged"), "{e}");
        assert!(parse("cgroup_parent = \"moat\"").expect_err("relative").to_string().contains("cgroup_parent must be an absolute path"));
    }

    #[test]
    fn default_seccomp_is_on_unless_turned_off() {
        assert!(defaults().default_seccomp);
        assert!(!parse("default_seccomp = false").expect("off").default_seccomp);
        assert!(parse("default_seccomp = true").expect("on").default_seccomp);
        assert!(parse("default_seccomp = 0").is_err(), "a boolean, not a number");
    }

    #[test]
    fn normalize_resolves_dots() {
        assert_eq!(normalize(Path::new("/a/b/../c/./d")), Path::new("/a/c/d"));
    }
}
