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
/// Debian's virtiofsd (package qemu-system-common).
pub const DEFAULT_VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";
pub const DEFAULT_STATE_DIR: &str = "/run/moat";
pub const DEFAULT_IMAGE_DIR: &str = "/var/lib/moat/images";
pub const DEFAULT_HOST_VCPUS: u8 = 1;
pub const DEFAULT_HOST_MEMORY_MIB: u32 = 256;
/// How long a microVM may take from the VMM's start to its agent answering.
pub const DEFAULT_BOOT_TIMEOUT_SECS: u32 = 120;
const MAX_BOOT_TIMEOUT_SECS: u64 = 3600;

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
    /// Give a container whose spec has no seccomp profile moat's default one (unless
    /// the container is privileged).
    pub default_seccomp: bool,
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
        let mut share = normalize(&prefix_bin.join("..").join("share").join("moat"));
        let build_tree = normalize(&prefix_bin.join("..").join("guest"));
        if !share.join("vmlinux").exists() && build_tree.join("vmlinux").exists() {
            share = build_tree;
        }
        MoatConfig {
            vmm: prefix_bin.join("moat-vmm"),
            kernel: share.join("vmlinux"),
            initrd: share.join("initramfs.cpio.gz"),
            virtiofsd: DEFAULT_VIRTIOFSD.into(),
            vcpus: DEFAULT_HOST_VCPUS,
            memory_mib: DEFAULT_HOST_MEMORY_MIB,
            state_dir: DEFAULT_STATE_DIR.into(),
            image_dir: DEFAULT_IMAGE_DIR.into(),
            boot_timeout_secs: DEFAULT_BOOT_TIMEOUT_SECS,
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

    /// Parses TOML text (`path` only names it in errors) over `defaults`.
    pub fn from_toml(path: &Path, text: &str, defaults: MoatConfig) -> Result<MoatConfig, HostConfigError> {
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

    fn defaults() -> MoatConfig {
        MoatConfig::defaults(Path::new("/opt/moat/bin"))
    }

    fn parse(text: &str) -> Result<MoatConfig, HostConfigError> {
        MoatConfig::from_toml(Path::new("/etc/moat/config.toml"), text, defaults())
    }

    #[test]
    fn defaults_follow_the_install_prefix() {
        let d = defaults();
        assert_eq!(d.vmm, Path::new("/opt/moat/bin/moat-vmm"));
        assert_eq!(d.kernel, Path::new("/opt/moat/share/moat/vmlinux"));
        assert_eq!(d.initrd, Path::new("/opt/moat/share/moat/initramfs.cpio.gz"));
        assert_eq!(d.virtiofsd, Path::new(DEFAULT_VIRTIOFSD));
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
        let d = MoatConfig::defaults(prefix_bin);
        let path = Path::new("moat.toml.example");
        assert_eq!(MoatConfig::from_toml(path, EXAMPLE, d.clone()).expect("as shipped"), d);
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
        assert!(uncommented.lines().filter(|l| l.contains(" = ") && !l.starts_with('#')).count() >= 10, "{uncommented}");
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
            default_seccomp: !d.default_seccomp,
        };
        assert_eq!(MoatConfig::from_toml(path, &uncommented, other).expect("uncommented"), d);
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
