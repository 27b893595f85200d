//! moat's configuration documents.
//!
//! [`VmConfig`] describes one microVM: it is the single document the shim (or `moat`)
//! hands to `moat-vmm`, either as a JSON file or built from flags. Every field has a
//! default except the kernel; [`VmConfig::validate`] rejects anything the VMM could not
//! honour, with a message that names the offending field.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod host;
pub use host::*;

/// Smallest guest RAM moat accepts. The project's kernel and initramfs boot in far
/// less, but below this a guest has no room left for a workload.
pub const MIN_MEMORY_MIB: u32 = 32;
/// Largest guest RAM: the memory map and the VMM's address-space layout are laid out
/// for guests up to this size.
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
/// Most vCPUs one VM may have: the MP table's APIC ids are 8 bits and the guest kernel
/// is built with `NR_CPUS=64`.
pub const MAX_VCPUS: u8 = 64;
/// Most virtio-blk disks per VM (each takes one of the IO-APIC's free IRQs).
pub const MAX_DISKS: usize = 16;
/// Most virtio-fs devices per VM.
pub const MAX_FS_DEVICES: usize = 8;
/// Longest virtio-fs tag: the device's config space holds it in 36 bytes.
pub const MAX_FS_TAG_LEN: usize = 36;
/// Longest kernel command line the boot protocol carries (x86 `COMMAND_LINE_SIZE`).
pub const MAX_CMDLINE_LEN: usize = 2048;

/// Kernel command line used when the config gives none. `reboot=k` makes a guest
/// reboot write the i8042 reset port, which the VMM turns into an exit; `panic=-1`
/// turns a guest panic into such a reboot, so a crashed guest never hangs.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet nomodule tsc=reliable no_timer_check";

/// Where the guest's serial console (ttyS0) goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type", content = "path")]
pub enum SerialOutput {
    /// The VMM's own standard output.
    #[default]
    Stdout,
    /// Appended to a file (created if missing).
    File(PathBuf),
    /// Discarded.
    None,
}

/// The guest's vsock device, backed on the host by a Unix socket (hybrid vsock):
/// the host connects to `uds_path` and sends `CONNECT <port>\n`; a guest connecting
/// to host port P reaches a listener at `<uds_path>_P`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more; 0-2 and u32::MAX are reserved).
    #[serde(default = "default_cid")]
    pub cid: u64,
    pub uds_path: PathBuf,
}

fn default_cid() -> u64 {
    3
}

/// A virtio-blk disk backed by a file (or block device) on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// A virtio-fs device whose file system is served by a vhost-user backend
/// (virtiofsd) listening on `socket`. The guest mounts it with
/// `mount -t virtiofs <tag> <dir>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The name the guest mounts it by: 1 to 36 bytes, no NUL.
    pub tag: String,
    /// The backend's vhost-user Unix socket; it must be listening when the VMM starts.
    pub socket: PathBuf,
}

/// One microVM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel: an ELF vmlinux with a PVH entry note, or a bzImage.
    pub kernel: PathBuf,
    /// Initramfs (cpio, optionally compressed), loaded high in guest RAM.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line. The VMM appends the virtio-mmio device announcements.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Serial console destination.
    #[serde(default)]
    pub serial: SerialOutput,
    /// Confine the VMM's threads with seccomp filters once the VM is built. Only for
    /// debugging a VMM change should this be turned off.
    #[serde(default = "default_true")]
    pub seccomp: bool,
    /// Back guest RAM with transparent huge pages where the host allows: far fewer
    /// page-fault exits while the guest boots, at the cost of host memory growing in
    /// 2 MiB steps as the guest touches it.
    #[serde(default = "default_true")]
    pub huge_pages: bool,
    /// A vsock device, if any.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// virtio-blk disks, in order: the guest sees them as vda, vdb, ...
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-fs devices. Any of them makes guest RAM a shared memory file, which
    /// the backends map.
    #[serde(default)]
    pub fs: Vec<FsConfig>,
}

fn default_true() -> bool {
    true
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_vcpus() -> u8 {
    1
}
fn default_memory_mib() -> u32 {
    128
}

/// Why a [`VmConfig`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not a valid VmConfig")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("vcpus must be between 1 and {max}, got {got}")]
    Vcpus { got: u64, max: u8 },
    #[error("memory_mib must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {0}")]
    Memory(u64),
    #[error("{what} {path} is not usable")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("{what} {path} is empty")]
    EmptyFile { what: &'static str, path: PathBuf },
    #[error("cmdline is {0} bytes; the limit is {MAX_CMDLINE_LEN}")]
    CmdlineTooLong(usize),
    #[error("cmdline contains a NUL or a newline")]
    CmdlineBadChar,
    #[error("vsock cid {0} is reserved; use 3 or more, below 4294967295")]
    VsockCid(u64),
    #[error("vsock uds_path is empty")]
    VsockPath,
    #[error("{0} disks requested; at most {MAX_DISKS} are supported")]
    TooManyDisks(usize),
    #[error("{0} virtio-fs devices requested; at most {MAX_FS_DEVICES} are supported")]
    TooManyFs(usize),
    #[error("virtio-fs tag {0:?} must be 1 to {MAX_FS_TAG_LEN} bytes without NUL")]
    FsTag(String),
    #[error("virtio-fs tag {0:?} is given twice")]
    FsTagTwice(String),
    #[error("virtio-fs socket path for tag {0:?} is empty")]
    FsSocketPath(String),
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: default_cmdline(),
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            serial: SerialOutput::default(),
            seccomp: true,
            huge_pages: true,
            vsock: None,
            disks: Vec::new(),
            fs: Vec::new(),
        }
    }
}

impl VmConfig {
    /// Reads a JSON `VmConfig` document.
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Checks everything that can be checked before touching KVM: counts, sizes, and
    /// that the kernel and initramfs are readable, non-empty regular files. Whether the
    /// kernel is a kernel at all is the loader's call.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_vcpus(u64::from(self.vcpus))?;
        check_memory(u64::from(self.memory_mib))?;
        check_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd)?;
        }
        if self.cmdline.len() > MAX_CMDLINE_LEN {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        if self.cmdline.contains(['\0', '\n']) {
            return Err(ConfigError::CmdlineBadChar);
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks(self.disks.len()));
        }
        for d in &self.disks {
            check_disk(&d.path)?;
        }
        self.check_fs()?;
        if let Some(v) = &self.vsock {
            if v.cid < 3 || v.cid >= u64::from(u32::MAX) {
                return Err(ConfigError::VsockCid(v.cid));
            }
            if v.uds_path.as_os_str().is_empty() {
                return Err(ConfigError::VsockPath);
            }
        }
        Ok(())
    }

    /// virtio-fs entries: a bounded count, valid unique tags, a socket path. Whether the
    /// socket exists and listens is checked when the VMM connects to it, since the
    /// backend may be started between validation and boot.
    fn check_fs(&self) -> Result<(), ConfigError> {
        if self.fs.len() > MAX_FS_DEVICES {
            return Err(ConfigError::TooManyFs(self.fs.len()));
        }
        for (i, f) in self.fs.iter().enumerate() {
            if f.tag.is_empty() || f.tag.len() > MAX_FS_TAG_LEN || f.tag.contains('\0') {
                return Err(ConfigError::FsTag(f.tag.clone()));
            }
            if self.fs[..i].iter().any(|g| g.tag == f.tag) {
                return Err(ConfigError::FsTagTwice(f.tag.clone()));
            }
            if f.socket.as_os_str().is_empty() {
                return Err(ConfigError::FsSocketPath(f.tag.clone()));
            }
        }
        Ok(())
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }
}

/// Validates a vCPU count given as a wider integer (flags parse into u64 so that an
/// out-of-range value is reported as such, not as a parse error).
pub fn check_vcpus(n: u64) -> Result<u8, ConfigError> {
    match u8::try_from(n) {
        Ok(v) if (1..=MAX_VCPUS).contains(&v) => Ok(v),
        _ => Err(ConfigError::Vcpus { got: n, max: MAX_VCPUS }),
    }
}

/// Validates a memory size in MiB given as a wider integer.
pub fn check_memory(mib: u64) -> Result<u32, ConfigError> {
    match u32::try_from(mib) {
        Ok(v) if (MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&v) => Ok(v),
        _ => Err(ConfigError::Memory(mib)),
    }
}

/// A disk is a regular file or a block device, and readable.
fn check_disk(path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::File {
        what: "disk",
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return Err(ConfigError::NotAFile { what: "disk", path: path.to_path_buf() });
    }
    Ok(())
}

fn check_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::File {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ConfigError::NotAFile { what, path: path.to_path_buf() });
    }
    if meta.len() == 0 {
        return Err(ConfigError::EmptyFile { what, path: path.to_path_buf() });
    }
    // Opening catches a file we may stat but not read.
    std::fs::File::open(path).map_err(|source| ConfigError::File {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn kernel_file() -> tempfile_lite::TempFile {
        let f = tempfile_lite::TempFile::new("kernel");
        f.file().write_all(b"not really a kernel").expect("write temp kernel");
        f
    }

    /// Minimal temporary file helper so the config crate needs no extra dependency.
    mod tempfile_lite {
        use std::path::PathBuf;
        pub struct TempFile(PathBuf);
        impl TempFile {
            pub fn new(tag: &str) -> Self {
                let p = std::env::temp_dir().join(format!(
                    "moat-config-test-{}-{}-{:?}",
                    tag,
                    std::process::id(),
                    std::thread::current().id()
                ));
                std::fs::File::create(&p).expect("create temp file");
                TempFile(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
            pub fn file(&self) -> std::fs::File {
                std::fs::OpenOptions::new().append(true).open(&self.0).expect("open temp file")
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn config_with(kernel: &Path) -> VmConfig {
        VmConfig { kernel: kernel.to_path_buf(), ..VmConfig::default() }
    }

    #[test]
    fn defaults_are_valid() {
        let k = kernel_file();
        let c = config_with(k.path());
        c.validate().expect("default config is valid");
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.memory_mib, 128);
        assert_eq!(c.memory_bytes(), 128 << 20);
    }

    #[test]
    fn vcpu_bounds() {
        assert!(check_vcpus(0).is_err());
        assert_eq!(check_vcpus(1).expect("1 vcpu"), 1);
        assert_eq!(check_vcpus(64).expect("64 vcpus"), 64);
        let e = check_vcpus(65).expect_err("65 vcpus");
        assert_eq!(e.to_string(), "vcpus must be between 1 and 64, got 65");
        assert!(check_vcpus(1 << 40).is_err());
    }

    #[test]
    fn memory_bounds() {
        let e = check_memory(16).expect_err("16 MiB");
        assert_eq!(e.to_string(), "memory_mib must be between 32 and 262144 MiB, got 16");
        assert!(check_memory(32).is_ok());
        assert!(check_memory(u64::from(MAX_MEMORY_MIB) + 1).is_err());
        assert!(check_memory(u64::MAX).is_err());
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let c = config_with(Path::new("/nonexistent/vmlinux"));
        let e = c.validate().expect_err("missing kernel");
        assert_eq!(e.to_string(), "kernel /nonexistent/vmlinux is not usable");
    }

    #[test]
    fn directory_and_empty_files_are_rejected() {
        let c = config_with(&std::env::temp_dir());
        assert!(matches!(c.validate(), Err(ConfigError::NotAFile { what: "kernel", .. })));
        let empty = tempfile_lite::TempFile::new("empty");
        let c = config_with(empty.path());
        assert!(matches!(c.validate(), Err(ConfigError::EmptyFile { what: "kernel", .. })));
        let k = kernel_file();
        let c = VmConfig { initrd: Some(empty.path().to_path_buf()), ..config_with(k.path()) };
        assert!(matches!(c.validate(), Err(ConfigError::EmptyFile { what: "initrd", .. })));
    }

    #[test]
    fn cmdline_checks() {
        let k = kernel_file();
        let c = VmConfig { cmdline: "a".repeat(MAX_CMDLINE_LEN + 1), ..config_with(k.path()) };
        assert!(matches!(c.validate(), Err(ConfigError::CmdlineTooLong(2049))));
        let c = VmConfig { cmdline: "console=ttyS0\ninit=/x".into(), ..config_with(k.path()) };
        assert!(matches!(c.validate(), Err(ConfigError::CmdlineBadChar)));
    }

    #[test]
    fn disk_checks() {
        let k = kernel_file();
        let disk = |p: &str| DiskConfig { path: p.into(), read_only: false };
        let c = VmConfig { disks: vec![disk("/nonexistent.img")], ..config_with(k.path()) };
        assert_eq!(c.validate().expect_err("missing disk").to_string(), "disk /nonexistent.img is not usable");
        let c = VmConfig { disks: vec![disk("/tmp")], ..config_with(k.path()) };
        assert!(matches!(c.validate(), Err(ConfigError::NotAFile { what: "disk", .. })));
        let c = VmConfig { disks: vec![DiskConfig { path: k.path().into(), read_only: true }; 17], ..config_with(k.path()) };
        assert!(matches!(c.validate(), Err(ConfigError::TooManyDisks(17))));
        let c = VmConfig { disks: vec![DiskConfig { path: k.path().into(), read_only: true }], ..config_with(k.path()) };
        c.validate().expect("a readable file is a valid disk");
    }

    #[test]
    fn vsock_checks() {
        let k = kernel_file();
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            let c = VmConfig { vsock: Some(VsockConfig { cid, uds_path: "/run/v.sock".into() }), ..config_with(k.path()) };
            assert!(matches!(c.validate(), Err(ConfigError::VsockCid(_))), "cid {cid}");
        }
        let c = VmConfig { vsock: Some(VsockConfig { cid: 3, uds_path: "".into() }), ..config_with(k.path()) };
        assert!(matches!(c.validate(), Err(ConfigError::VsockPath)));
        let c = VmConfig { vsock: Some(VsockConfig { cid: 3, uds_path: "/run/v.sock".into() }), ..config_with(k.path()) };
        c.validate().expect("valid vsock");
    }

    #[test]
    fn fs_checks() {
        let k = kernel_file();
        let fs = |tag: &str, socket: &str| FsConfig { tag: tag.into(), socket: socket.into() };
        let with = |v: Vec<FsConfig>| VmConfig { fs: v, ..config_with(k.path()) };
        with(vec![fs("moatfs", "/run/fs.sock"), fs(&"t".repeat(36), "/run/b.sock")]).validate().expect("valid fs");
        for bad in ["", "a\0b", &"t".repeat(37)] {
            let e = with(vec![fs(bad, "/s")]).validate().expect_err("bad tag");
            assert!(matches!(e, ConfigError::FsTag(_)), "tag {bad:?}: {e}");
        }
        let e = with(vec![fs("x", "/a"), fs("x", "/b")]).validate().expect_err("duplicate");
        assert_eq!(e.to_string(), "virtio-fs tag \"x\" is given twice");
        assert!(matches!(with(vec![fs("x", "")]).validate(), Err(ConfigError::FsSocketPath(_))));
        let many = (0..9).map(|i| fs(&format!("t{i}"), "/s")).collect();
        assert!(matches!(with(many).validate(), Err(ConfigError::TooManyFs(9))));
        let parsed: VmConfig =
            serde_json::from_str(r#"{"kernel": "/k", "fs": [{"tag": "moatfs", "socket": "/run/fs.sock"}]}"#).expect("fs json");
        assert_eq!(parsed.fs, vec![fs("moatfs", "/run/fs.sock")]);
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "fs": [{"tag": "a", "socket": "/s", "ro": true}]}"#).is_err());
    }

    #[test]
    fn json_round_trip_and_unknown_fields() {
        let c = VmConfig {
            kernel: "/k".into(),
            initrd: Some("/i".into()),
            serial: SerialOutput::File("/tmp/console.log".into()),
            ..VmConfig::default()
        };
        let text = serde_json::to_string(&c).expect("serialize");
        let back: VmConfig = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, c);
        let minimal: VmConfig = serde_json::from_str(r#"{"kernel": "/k"}"#).expect("minimal");
        assert_eq!(minimal.cmdline, DEFAULT_CMDLINE);
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "vcpu": 2}"#).is_err());
    }
}
