//! `moat doctor`: checks that a host can run moat and says what to fix, one line
//! per check. Each check is a function returning [`Check`]s, so the pieces that
//! need no particular host (file magic, PATH lookup, writable directories) are
//! unit-tested on temp files.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moat_config::MoatConfig;

use crate::containerd_config::{self as cc, ConfigVersion, Registration};

/// The shim binary containerd derives from the runtime type `io.containerd.moat.v2`.
pub const SHIM_BINARY: &str = "containerd-shim-moat-v2";
/// This build's version; the shim binary prints the same with `-v`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The API version every KVM since Linux 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;
/// How long `containerd --version` or `containerd-shim-moat-v2 -v` may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One line of the report: what was checked and, unless it is fine, how to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub level: Level,
    pub what: String,
    pub fix: String,
}

impl Check {
    fn ok(what: impl Into<String>) -> Check {
        Check { level: Level::Ok, what: what.into(), fix: String::new() }
    }
    fn warn(what: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { level: Level::Warn, what: what.into(), fix: fix.into() }
    }
    fn fail(what: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { level: Level::Fail, what: what.into(), fix: fix.into() }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.level {
            Level::Ok => write!(f, "ok    {}", self.what),
            Level::Warn => write!(f, "WARN  {}: {}", self.what, self.fix),
            Level::Fail => write!(f, "FAIL  {}: {}", self.what, self.fix),
        }
    }
}

/// What `moat doctor` was asked.
#[derive(Clone, Debug)]
pub struct Options {
    /// containerd's config file.
    pub containerd_config: PathBuf,
}

/// Runs every check, in the order they are best fixed.
pub fn run(opts: &Options) -> Vec<Check> {
    let mut out = vec![root()];
    out.extend(kvm(Path::new("/dev/kvm"), Path::new("/sys/module/kvm_pvm")));
    let cfg_file = MoatConfig::file();
    let cfg_name = cfg_file.as_ref().map_or_else(|| moat_config::DEFAULT_CONFIG_PATH.to_string(), |p| p.display().to_string());
    match MoatConfig::load() {
        Ok(cfg) => {
            out.push(Check::ok(match &cfg_file {
                Some(p) => format!("config {} parses", p.display()),
                None => format!("config: built-in defaults ({} does not exist)", moat_config::DEFAULT_CONFIG_PATH),
            }));
            let set = |key: &str| format!("set {key} in {cfg_name}");
            out.push(executable("moat-vmm", &cfg.vmm, &format!("install it (make install) or {}", set("vmm"))));
            let vfsd = executable("virtiofsd", &cfg.virtiofsd, &format!("install moat's (make install), or {}", set("virtiofsd")));
            let vfsd_ok = vfsd.level == Level::Ok;
            out.push(vfsd);
            if vfsd_ok {
                out.push(virtiofsd_version(&cfg.virtiofsd, &set("virtiofsd")));
            }
            out.extend(jail(&cfg, &set("jail")));
            out.push(kernel(&cfg.kernel, &format!("make guest && make install, or {}", set("kernel"))));
            out.push(nonempty("guest initramfs", &cfg.initrd, &format!("make guest && make install, or {}", set("initrd"))));
            out.push(writable_dir("state dir", &cfg.state_dir, &set("state_dir")));
            out.push(writable_dir("image dir", &cfg.image_dir, &set("image_dir")));
            out.push(disk_dir(&cfg.disk_dir, &set("disk_dir")));
            let path = std::env::var_os("PATH").unwrap_or_default();
            out.push(match find_in_path(&path, "mkfs.ext4").or_else(|| find_in_path(std::ffi::OsStr::new("/usr/sbin:/sbin"), "mkfs.ext4")) {
                Some(p) => Check::ok(format!("mkfs.ext4 at {} (moat run's writable layers)", p.display())),
                None => Check::fail("mkfs.ext4 is missing", "apt-get install e2fsprogs: moat run makes each writable layer with it"),
            });
            out.push(Check::ok(format!("a VM may have at most {} and {}", cfg.max_vcpus, cfg.max_memory_mib)));
            out.push(image_cache(&cfg.image_dir, cfg.image_cache_mib, &set("image_cache_mib")));
        }
        Err(e) => out.push(Check::fail(
            format!("config {cfg_name}"),
            format!("{}; fix it (every key and its default: moat's config/moat.toml.example); the checks of the paths it sets are skipped", crate::error_chain(&e)),
        )),
    }
    out.push(cgroup2(Path::new("/sys/fs/cgroup")));
    let path = std::env::var_os("PATH").unwrap_or_default();
    let containerd = find_in_path(&path, "containerd");
    out.push(shim(&path, containerd.is_some()));
    out.extend(containerd_checks(containerd.as_deref(), &opts.containerd_config));
    out
}

/// The one-line report's exit status: 1 if anything failed.
pub fn exit_code(checks: &[Check]) -> i32 {
    i32::from(checks.iter().any(|c| c.level == Level::Fail))
}

fn root() -> Check {
    if nix::unistd::geteuid().is_root() {
        Check::ok("running as root")
    } else {
        Check::warn(
            "not running as root",
            "moat run and containerd's shim run as root; run moat doctor as root so the checks see what they see",
        )
    }
}

fn kvm(dev: &Path, pvm_module: &Path) -> Vec<Check> {
    let what = dev.display().to_string();
    if !dev.exists() {
        return vec![Check::fail(
            format!("{what} is missing"),
            "enable virtualization (VT-x/AMD-V) in the firmware, or nested virtualization for a VM, and modprobe kvm_intel or kvm_amd",
        )];
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        return vec![Check::fail(format!("{what} cannot be opened read-write ({e})"), "run as root, or add the user to the group owning it (kvm)")];
    }
    let mut out = vec![match kvm_ioctls::Kvm::new() {
        Ok(kvm) => match kvm.get_api_version() {
            KVM_API_VERSION => Check::ok(format!("{what}: KVM API version {KVM_API_VERSION}")),
            v => Check::fail(format!("{what}: KVM API version {v}, not {KVM_API_VERSION}"), "use a Linux kernel with standard KVM"),
        },
        Err(e) => Check::fail(format!("{what}: KVM does not answer ({e})"), "check dmesg for KVM errors"),
    }];
    if pvm_module.exists() {
        out.push(Check::fail(
            format!("{what} is PVM ({} exists)", pvm_module.display()),
            "this KVM cannot boot an unmodified Linux guest, so moat cannot run containers here: use a host with \
             hardware KVM (kvm_intel or kvm_amd); moat's own tests run through integration/testhost",
        ));
    }
    out
}

fn is_executable_file(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn executable(name: &str, p: &Path, fix: &str) -> Check {
    match std::fs::metadata(p) {
        Err(e) => Check::fail(format!("{name} {}: {e}", p.display()), fix),
        Ok(m) if !m.is_file() => Check::fail(format!("{name} {} is not a file", p.display()), fix),
        Ok(_) if !is_executable_file(p) => Check::fail(format!("{name} {} is not executable", p.display()), format!("chmod +x it, or {fix}")),
        Ok(_) => Check::ok(format!("{name} {}", p.display())),
    }
}

/// Reads up to `n` bytes from the start of `p`, and the file's size.
fn head(p: &Path, n: usize) -> std::io::Result<(Vec<u8>, u64)> {
    let f = std::fs::File::open(p)?;
    let len = f.metadata()?.len();
    let mut buf = Vec::with_capacity(n);
    f.take(n as u64).read_to_end(&mut buf)?;
    Ok((buf, len))
}

fn nonempty(name: &str, p: &Path, fix: &str) -> Check {
    match head(p, 1) {
        Err(e) => Check::fail(format!("{name} {}: {e}", p.display()), fix),
        Ok((_, 0)) => Check::fail(format!("{name} {} is empty", p.display()), fix),
        Ok(_) => Check::ok(format!("{name} {}", p.display())),
    }
}

/// The kind of a guest kernel image from its first bytes.
fn kernel_kind(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"\x7fELF") {
        Some("ELF vmlinux")
    } else if head.get(0x202..0x206) == Some(b"HdrS") {
        Some("bzImage")
    } else {
        None
    }
}

fn kernel(p: &Path, fix: &str) -> Check {
    match head(p, 0x206) {
        Err(e) => Check::fail(format!("guest kernel {}: {e}", p.display()), fix),
        Ok((_, 0)) => Check::fail(format!("guest kernel {} is empty", p.display()), fix),
        Ok((h, _)) => match kernel_kind(&h) {
            Some(kind) => Check::ok(format!("guest kernel {} ({kind})", p.display())),
            None => Check::fail(format!("guest kernel {} is neither an ELF vmlinux nor a bzImage", p.display()), fix),
        },
    }
}

/// `dir` is writable, or can be created: its nearest existing ancestor is a writable
/// directory.
fn writable_dir(name: &str, dir: &Path, fix: &str) -> Check {
    let mut cur = dir;
    loop {
        match std::fs::metadata(cur) {
            Ok(m) if !m.is_dir() => {
                return Check::fail(format!("{name} {}: {} is not a directory", dir.display(), cur.display()), fix)
            }
            Ok(_) => {
                let how = if cur == dir { String::new() } else { format!(" (created in {})", cur.display()) };
                return match nix::unistd::access(cur, nix::unistd::AccessFlags::W_OK) {
                    Ok(()) => Check::ok(format!("{name} {} writable{how}", dir.display())),
                    Err(e) => Check::fail(
                        format!("{name} {}: {} is not writable ({e})", dir.display(), cur.display()),
                        format!("run as root, or {fix}"),
                    ),
                };
            }
            Err(_) => match cur.parent() {
                Some(p) => cur = p,
                None => return Check::fail(format!("{name} {}: no ancestor exists", dir.display()), fix),
            },
        }
    }
}

/// The Rust virtiofsd answers `--version` with `virtiofsd 1.x`; QEMU's old C one,
/// end of life and without the options moat passes, does not.
fn virtiofsd_version(p: &Path, fix: &str) -> Check {
    match output_of(Command::new(p).arg("--version")) {
        Ok(out) if out.starts_with("virtiofsd ") => Check::ok(format!("virtiofsd {}: {}", p.display(), out.trim())),
        _ => Check::fail(
            format!("virtiofsd {} is not the Rust virtiofsd", p.display()),
            format!("moat needs the Rust virtiofsd (make install puts it in <prefix>/libexec/moat), or {fix}"),
        ),
    }
}

/// moat-vmm's jail: on, with a static moat-vmm and ids nobody else has.
fn jail(cfg: &MoatConfig, fix: &str) -> Vec<Check> {
    if !cfg.jail {
        return vec![Check::warn("jail = false: moat-vmm runs as root in the host's namespaces", format!("turn it back on: {fix} to true"))];
    }
    let mut out = vec![match crate::jail::is_static_elf(&cfg.vmm) {
        Ok(true) => Check::ok(format!("moat-vmm is statically linked (its jail holds no libraries); runs as {}:{}", cfg.jail_uid, cfg.jail_gid)),
        Ok(false) => Check::fail(
            format!("moat-vmm {} is dynamically linked", cfg.vmm.display()),
            "the jail holds no libraries: install the static build (make build && make install)",
        ),
        Err(e) => Check::fail(format!("moat-vmm {}: {e}", cfg.vmm.display()), "install it (make install)"),
    }];
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    if let Some(user) = passwd.lines().find(|l| l.split(':').nth(2) == Some(&cfg.jail_uid.to_string())) {
        let name = user.split(':').next().unwrap_or_default();
        out.push(Check::warn(
            format!("the jail uid {} is also the user {name}'s", cfg.jail_uid),
            "pick a uid no one uses (jail_uid and jail_gid in the moat config)",
        ));
    }
    out
}

/// The writable layers' directory: on disk, not in RAM.
fn disk_dir(dir: &Path, fix: &str) -> Check {
    let w = writable_dir("disk dir", dir, fix);
    if w.level != Level::Ok {
        return w;
    }
    let mut probe = dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    match nix::sys::statfs::statfs(probe) {
        Ok(fs) if fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC => Check::warn(
            format!("disk dir {} is on a tmpfs", dir.display()),
            format!("writable layers there use RAM, not disk: {fix} to a directory on disk"),
        ),
        _ => w,
    }
}

/// How much the image cache holds, against its cap (`cap_mib`, 0: none).
fn image_cache(dir: &Path, cap_mib: u64, set_cap: &str) -> Check {
    let images = match crate::image::cache::list(dir) {
        Ok(i) => i,
        Err(e) => return Check::warn(format!("image cache {}: {}", dir.display(), crate::error_chain(&e)), "run as root, or fix its permissions"),
    };
    let bytes = images.iter().fold(0u64, |t, i| t.saturating_add(i.bytes));
    let held = format!("image cache {} holds {} images, {}", dir.display(), images.len(), crate::image::cache::human_size(bytes));
    if cap_mib == 0 {
        return Check::ok(format!("{held} (image_cache_mib = 0: no limit)"));
    }
    if bytes > cap_mib.saturating_mul(1 << 20) {
        let in_use = images.iter().filter(|i| i.in_use).count();
        return Check::warn(
            format!("{held}, above image_cache_mib = {cap_mib} ({in_use} in use)"),
            format!("moat image prune (images in use stay), or {set_cap}"),
        );
    }
    Check::ok(format!("{held} (image_cache_mib = {cap_mib})"))
}

fn cgroup2(mnt: &Path) -> Check {
    if mnt.join("cgroup.controllers").is_file() {
        Check::ok(format!("cgroup v2 at {}", mnt.display()))
    } else {
        Check::warn(
            format!("cgroup v2 is not mounted at {}", mnt.display()),
            "containerd places pods in cgroups; boot with systemd.unified_cgroup_hierarchy=1 or mount -t cgroup2 none /sys/fs/cgroup",
        )
    }
}

/// The first executable `name` in the PATH-style list `path`.
pub fn find_in_path(path: &std::ffi::OsStr, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path).map(|d| d.join(name)).find(|p| is_executable_file(p))
}

/// Runs `cmd` with a deadline; its stdout and stderr together, if it exits 0.
pub fn output_of(cmd: &mut Command) -> Result<String, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let pipes: Vec<Box<dyn Read + Send>> = [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
        child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .collect();
    let readers: Vec<_> = pipes
        .into_iter()
        .map(|p| {
            std::thread::spawn(move || {
                let mut s = Vec::new();
                let _ = p.take(64 * 1024).read_to_end(&mut s);
                s
            })
        })
        .collect();
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s", COMMAND_TIMEOUT.as_secs()));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let text: String = readers.into_iter().filter_map(|r| r.join().ok()).map(|b| String::from_utf8_lossy(&b).into_owned()).collect();
    if status.success() {
        Ok(text)
    } else {
        Err(format!("{status}: {}", text.trim()))
    }
}

/// The version in `containerd-shim-moat-v2 -v` output ("  Version: 0.1.0").
fn shim_version(output: &str) -> Option<&str> {
    output.lines().find_map(|l| l.trim().strip_prefix("Version:")).map(str::trim)
}

fn shim(path: &std::ffi::OsStr, containerd: bool) -> Check {
    let missing = |what: String, fix: String| if containerd { Check::fail(what, fix) } else { Check::warn(what, fix) };
    let Some(found) = find_in_path(path, SHIM_BINARY) else {
        return missing(
            format!("{SHIM_BINARY} is not on PATH"),
            "containerd finds runtime io.containerd.moat.v2 through its PATH: install it into /usr/local/bin (make install)".into(),
        );
    };
    let reinstall = "reinstall moat (make install) so both come from one build, or fix PATH";
    let version = match output_of(Command::new(&found).arg("-v")) {
        Ok(out) => match shim_version(&out) {
            Some(v) => v.to_string(),
            None => return Check::fail(format!("{} -v prints no version", found.display()), reinstall),
        },
        Err(e) => return Check::fail(format!("{} -v failed ({e})", found.display()), format!("it is older than this moat or broken: {reinstall}")),
    };
    if version != VERSION {
        return Check::fail(format!("{} is version {version}, this moat is {VERSION}", found.display()), reinstall);
    }
    // Same version number, but maybe another build: compare with the shim installed
    // beside this moat, if there is one.
    let sibling = std::env::current_exe().ok().and_then(|p| p.canonicalize().ok()).and_then(|p| p.parent().map(|d| d.join(SHIM_BINARY)));
    if let Some(sib) = sibling.filter(|s| s.exists()) {
        let same_file = sib.canonicalize().ok() == found.canonicalize().ok();
        if !same_file && std::fs::read(&sib).ok() != std::fs::read(&found).ok() {
            return Check::warn(
                format!("{} (on PATH) differs from {} (beside this moat)", found.display(), sib.display()),
                reinstall,
            );
        }
    }
    Check::ok(format!("{SHIM_BINARY} {} on PATH, version {version}", found.display()))
}

/// `containerd --version` of the containerd at `bin`: its major version and version word.
pub fn containerd_version(bin: &Path) -> Result<(u64, String), String> {
    let out = output_of(Command::new(bin).arg("--version"))?;
    cc::parse_containerd_version(&out).ok_or_else(|| format!("no version in {:?}", out.trim()))
}

fn containerd_checks(bin: Option<&Path>, config: &Path) -> Vec<Check> {
    let Some(bin) = bin else {
        return vec![Check::warn(
            "containerd is not on PATH",
            "moat run works without it; for ctr, Docker or Kubernetes install containerd (apt-get install containerd)",
        )];
    };
    let apply = if config == Path::new(cc::DEFAULT_CONTAINERD_CONFIG) {
        "moat containerd-config --apply".to_string()
    } else {
        format!("moat containerd-config --apply {}", config.display())
    };
    let (major, mut out) = match containerd_version(bin) {
        Ok((major, v)) => (Some(major), vec![Check::ok(format!("containerd {v} ({})", bin.display()))]),
        Err(e) => (None, vec![Check::warn(format!("{} --version: {e}", bin.display()), "check the containerd install")]),
    };
    let state = match cc::inspect_file(config) {
        Ok(Some(s)) => s,
        Ok(None) => {
            out.push(Check::warn(
                format!("containerd config {} does not exist, so CRI has no runtime moat", config.display()),
                format!("{apply} (ctr and Docker need no config)"),
            ));
            return out;
        }
        Err(e) => {
            out.push(Check::fail(crate::error_chain(&e), "fix it: containerd refuses to start with a config it cannot read"));
            return out;
        }
    };
    let name = config.display();
    let version = match (state.version, major) {
        (None, _) => {
            out.push(Check::warn(format!("containerd config {name} has no version line (read as version 1)"), format!("add `version = 2` at its top (containerd config migrate helps), then {apply}")));
            return out;
        }
        (Some(3), Some(1)) => {
            out.push(Check::fail(format!("containerd config {name} is version 3, whose plugin sections containerd 1.x does not know"), "write it as version 2 or upgrade containerd"));
            return out;
        }
        (Some(2), _) => ConfigVersion::V2,
        (Some(3), _) => ConfigVersion::V3,
        (Some(n), _) => {
            out.push(Check::warn(format!("containerd config {name} is version {n}"), "moat knows versions 2 and 3; register the runtime by hand (moat containerd-config prints it)"));
            return out;
        }
    };
    if state.cri_disabled {
        out.push(Check::warn(format!("containerd config {name} disables the CRI plugin (disabled_plugins)"), "remove it from disabled_plugins for Kubernetes (ctr and Docker work without it)"));
    }
    out.push(match state.moat {
        Registration::Registered => Check::ok(format!("containerd config {name} registers runtime moat for CRI ({})", version.table())),
        Registration::Absent => Check::warn(format!("containerd config {name} has no runtime moat for CRI"), format!("{apply}, then restart containerd")),
        Registration::Different(found) => Check::warn(
            format!("containerd config {name}: runtime moat is not {} ({found})", cc::RUNTIME_TYPE),
            format!("set runtime_type = \"{}\" in [{}]", cc::RUNTIME_TYPE, version.table()),
        ),
    });
    out
}


#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, bytes: &[u8], mode: u32) {
        std::fs::write(p, bytes).expect("write");
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn the_rust_virtiofsd_is_told_from_others() {
        let d = tempfile::tempdir().expect("tmp");
        let rust = d.path().join("virtiofsd");
        write(&rust, b"#!/bin/sh\necho virtiofsd 1.14.0\n", 0o755);
        assert_eq!(virtiofsd_version(&rust, "x").level, Level::Ok);
        let c = d.path().join("old");
        write(&c, b"#!/bin/sh\necho 'virtiofsd: unknown option --version' >&2; exit 1\n", 0o755);
        let check = virtiofsd_version(&c, "set virtiofsd");
        assert_eq!(check.level, Level::Fail);
        assert!(check.fix.contains("Rust virtiofsd"), "{check}");
    }

    #[test]
    fn a_disk_dir_in_ram_is_flagged() {
        let d = tempfile::tempdir_in("/var/tmp").expect("tmp on disk");
        assert_eq!(disk_dir(&d.path().join("scratch"), "x").level, Level::Ok);
        if Path::new("/dev/shm").is_dir() {
            let shm = tempfile::tempdir_in("/dev/shm").expect("tmp in /dev/shm");
            let check = disk_dir(shm.path(), "set disk_dir");
            assert_eq!(check.level, Level::Warn, "{check}");
            assert!(check.what.contains("tmpfs"), "{check}");
        }
    }

    #[test]
    fn lines_have_the_documented_shape() {
        assert_eq!(Check::ok("a").to_string(), "ok    a");
        assert_eq!(Check::warn("b", "do x").to_string(), "WARN  b: do x");
        assert_eq!(Check::fail("c", "do y").to_string(), "FAIL  c: do y");
        assert_eq!(exit_code(&[Check::ok("a"), Check::warn("b", "x")]), 0);
        assert_eq!(exit_code(&[Check::ok("a"), Check::fail("c", "y")]), 1);
    }

    #[test]
    fn kernel_magic() {
        let d = tempfile::tempdir().expect("tmp");
        let elf = d.path().join("vmlinux");
        write(&elf, b"\x7fELF\x02\x01\x01", 0o644);
        assert_eq!(kernel(&elf, "fix").level, Level::Ok);
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bzp = d.path().join("bzImage");
        write(&bzp, &bz, 0o644);
        let c = kernel(&bzp, "fix");
        assert_eq!((c.level, c.what.ends_with("(bzImage)")), (Level::Ok, true), "{c}");
        let junk = d.path().join("junk");
        write(&junk, b"#!/bin/sh\n", 0o644);
        assert_eq!(kernel(&junk, "fix").level, Level::Fail);
        let empty = d.path().join("empty");
        write(&empty, b"", 0o644);
        assert!(kernel(&empty, "fix").what.ends_with("is empty"));
        assert_eq!(nonempty("initramfs", &empty, "fix").level, Level::Fail);
        assert_eq!(nonempty("initramfs", &junk, "fix").level, Level::Ok);
        let c = kernel(&d.path().join("absent"), "make guest");
        assert_eq!(c.level, Level::Fail);
        assert!(c.to_string().contains("absent") && c.to_string().ends_with(": make guest"), "{c}");
    }

    #[test]
    fn executables_and_path_lookup() {
        let d = tempfile::tempdir().expect("tmp");
        let a = d.path().join("a");
        let b = d.path().join("b");
        std::fs::create_dir_all(&a).expect("a");
        std::fs::create_dir_all(&b).expect("b");
        write(&a.join("tool"), b"x", 0o644);
        write(&b.join("tool"), b"x", 0o755);
        assert_eq!(executable("tool", &a.join("tool"), "fix").level, Level::Fail);
        assert_eq!(executable("tool", &b.join("tool"), "fix").level, Level::Ok);
        assert_eq!(executable("tool", &a, "fix").level, Level::Fail, "a directory");
        let path = std::env::join_paths([&a, &b]).expect("join");
        assert_eq!(find_in_path(&path, "tool"), Some(b.join("tool")), "skips the non-executable one");
        assert_eq!(find_in_path(&path, "other"), None);
    }

    #[test]
    fn writable_dirs() {
        let d = tempfile::tempdir().expect("tmp");
        let c = writable_dir("state dir", &d.path().join("x/y"), "fix");
        assert_eq!(c.level, Level::Ok, "{c}");
        assert!(c.what.contains("created in"), "{c}");
        let f = d.path().join("file");
        write(&f, b"", 0o644);
        assert_eq!(writable_dir("state dir", &f.join("sub"), "fix").level, Level::Fail);
    }

    #[test]
    fn image_cache_against_its_cap() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = d.path().join("images");
        let c = image_cache(&dir, 1, "set image_cache_mib");
        assert_eq!(c.to_string(), format!("ok    image cache {} holds 0 images, 0 B (image_cache_mib = 1)", dir.display()));
        let image = dir.join("ab".repeat(32));
        std::fs::create_dir_all(image.join("rootfs")).expect("image");
        std::fs::write(image.join("size"), (2u64 << 20).to_string()).expect("size");
        let c = image_cache(&dir, 1, "set image_cache_mib");
        assert_eq!(c.level, Level::Warn, "{c}");
        assert!(c.what.ends_with("holds 1 images, 2.0 MiB, above image_cache_mib = 1 (0 in use)"), "{c}");
        assert!(c.fix.starts_with("moat image prune"), "{c}");
        assert_eq!(image_cache(&dir, 2, "x").level, Level::Ok);
        assert!(image_cache(&dir, 0, "x").what.contains("no limit"));
    }

    #[test]
    fn commands_and_versions() {
        assert_eq!(shim_version("containerd-shim-moat-v2:\n  Version: 0.1.0\n"), Some("0.1.0"));
        assert_eq!(shim_version("Shim namespace cannot be empty"), None);
        assert_eq!(output_of(Command::new("sh").args(["-c", "echo hi"])).expect("sh"), "hi\n");
        let e = output_of(Command::new("sh").args(["-c", "echo oops >&2; exit 3"])).expect_err("fails");
        assert!(e.contains("3") && e.contains("oops"), "{e}");
        assert!(output_of(&mut Command::new("/nonexistent/containerd")).is_err());
    }

    #[test]
    fn containerd_config_lines() {
        let d = tempfile::tempdir().expect("tmp");
        let bin = d.path().join("containerd");
        write(&bin, b"#!/bin/sh\necho containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1\n", 0o755);
        let cfg = d.path().join("config.toml");
        let lines = containerd_checks(Some(&bin), &cfg);
        assert_eq!(lines[0].to_string(), format!("ok    containerd 1.6.20~ds1 ({})", bin.display()));
        assert_eq!(lines[1].level, Level::Warn);
        assert!(lines[1].fix.contains(&format!("moat containerd-config --apply {}", cfg.display())), "{}", lines[1]);
        cc::apply(&cfg, 1).expect("apply");
        let lines = containerd_checks(Some(&bin), &cfg);
        assert_eq!((lines.len(), lines[1].level), (2, Level::Ok), "{lines:?}");
        std::fs::write(&cfg, "version = 3\n").expect("write");
        assert_eq!(containerd_checks(Some(&bin), &cfg)[1].level, Level::Fail, "version 3 for containerd 1.x");
        std::fs::write(&cfg, "version = 2\nroot = /var/lib/containerd\n").expect("write");
        let c = &containerd_checks(Some(&bin), &cfg)[1];
        assert!(c.level == Level::Fail && c.what.starts_with(&format!("{} line 2: invalid TOML: ", cfg.display())), "{c}");
        assert!(!c.to_string().contains('\n'), "one line: {c}");
        assert_eq!(containerd_checks(None, &cfg)[0].level, Level::Warn);
    }
}
