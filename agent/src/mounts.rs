//! A container's root filesystem, built by the `__init` helper inside the container's
//! new mount namespace: the spec's mounts, device nodes, masked and read-only paths,
//! sysctls, then pivot_root (or, where the guest's root cannot be pivoted, a move
//! and chroot). Paths inside the rootfs are resolved without leaving it: a symlink in
//! the image cannot point a mount at the guest's own files.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::spec::{Device, Mount};

/// Everything the helper needs to build a container's rootfs.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct RootfsPlan {
    pub root: String,
    pub readonly: bool,
    pub mounts: Vec<Mount>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub sysctl: BTreeMap<String, String>,
    pub devices: Vec<Device>,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    pub propagation: Option<String>,
}

type R<T> = std::result::Result<T, String>;

fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// Resolves `path` inside `root` as if `root` were `/`: `..` and symlinks (absolute
/// ones included) never lead outside it. Missing components are taken literally.
pub fn resolve_in_root(root: &Path, path: &str) -> R<PathBuf> {
    let mut todo: Vec<String> =
        Path::new(path).components().rev().filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        }).collect();
    let mut done: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            done.pop();
            continue;
        }
        let candidate = root.join(done.iter().collect::<PathBuf>()).join(&part);
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(format!("{path}: too many levels of symbolic links"));
                }
                let target = fs::read_link(&candidate).map_err(|e| err(candidate.display(), e))?;
                if target.is_absolute() {
                    done.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(s) => todo.push(s.to_string_lossy().into_owned()),
                        Component::ParentDir => todo.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => done.push(part),
        }
    }
    Ok(root.join(done.iter().collect::<PathBuf>()))
}

/// mount(8)-style options: (flags, propagation flags, data, bind, recursive bind).
#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub flags: MsFlags,
    pub clear: MsFlags,
    pub propagation: MsFlags,
    pub data: Vec<String>,
    pub bind: bool,
    pub recursive: bool,
}

pub fn parse_options(opts: &[String]) -> Options {
    let mut o = Options {
        flags: MsFlags::empty(),
        clear: MsFlags::empty(),
        propagation: MsFlags::empty(),
        data: Vec::new(),
        bind: false,
        recursive: false,
    };
    for opt in opts {
        let (set, clear): (MsFlags, MsFlags) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "lazytime" => (MsFlags::MS_LAZYTIME, MsFlags::empty()),
            "nolazytime" => (MsFlags::empty(), MsFlags::MS_LAZYTIME),
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "bind" => {
                o.bind = true;
                continue;
            }
            "rbind" => {
                o.bind = true;
                o.recursive = true;
                continue;
            }
            p @ ("private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable") => {
                o.propagation |= propagation_flags(p);
                continue;
            }
            data => {
                o.data.push(data.to_string());
                continue;
            }
        };
        o.flags = (o.flags | set) & !clear;
        o.clear = (o.clear | clear) & !set;
    }
    o
}

pub fn propagation_flags(p: &str) -> MsFlags {
    let rec = if p.starts_with('r') { MsFlags::MS_REC } else { MsFlags::empty() };
    rec | match p.trim_start_matches('r') {
        "private" => MsFlags::MS_PRIVATE,
        "shared" => MsFlags::MS_SHARED,
        "slave" => MsFlags::MS_SLAVE,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        _ => MsFlags::empty(),
    }
}

fn mkdir_all(p: &Path) -> R<()> {
    fs::create_dir_all(p).map_err(|e| err(format!("cannot create {}", p.display()), e))
}

fn do_mount(src: Option<&str>, target: &Path, fstype: Option<&str>, flags: MsFlags, data: Option<&str>) -> R<()> {
    mount(src, target, fstype, flags, data).map_err(|e| {
        err(format!("cannot mount {} ({}) on {}", src.unwrap_or("none"), fstype.unwrap_or("bind"), target.display()), e)
    })
}

fn mount_one(root: &Path, m: &Mount) -> R<()> {
    let target = resolve_in_root(root, &m.destination)?;
    let o = parse_options(&m.options);
    let kind = m.kind.as_deref().unwrap_or(if o.bind { "bind" } else { "none" });
    let data = o.data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    if o.bind || kind == "bind" {
        let src = m.source.as_deref().ok_or_else(|| format!("mount {}: a bind mount needs a source", m.destination))?;
        let meta = fs::metadata(src).map_err(|e| err(format!("mount {}: source {src}", m.destination), e))?;
        if meta.is_dir() {
            mkdir_all(&target)?;
        } else if !target.exists() {
            if let Some(parent) = target.parent() {
                mkdir_all(parent)?;
            }
            fs::File::create(&target).map_err(|e| err(format!("cannot create {}", target.display()), e))?;
        }
        let rec = if o.recursive { MsFlags::MS_REC } else { MsFlags::empty() };
        do_mount(Some(src), &target, None, MsFlags::MS_BIND | rec, None)?;
        if !o.flags.is_empty() {
            do_mount(None, &target, None, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | rec | o.flags, None)?;
        }
    } else {
        mkdir_all(&target)?;
        let fstype = if kind == "cgroup" { "cgroup2" } else { kind };
        let src = m.source.as_deref().unwrap_or(fstype);
        match do_mount(Some(src), &target, Some(fstype), o.flags, data) {
            Ok(()) => {}
            // sysfs of a network namespace the container shares with the guest:
            // bind the guest's (read-only, as the spec asks).
            Err(_) if fstype == "sysfs" => {
                do_mount(Some("/sys"), &target, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
                do_mount(None, &target, None, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | o.flags, None)?;
            }
            Err(e) => return Err(e),
        }
    }
    if !o.propagation.is_empty() {
        do_mount(None, &target, None, o.propagation, None)?;
    }
    Ok(())
}

/// The device nodes every container gets when its /dev is a fresh tmpfs.
const DEFAULT_DEVICES: &[(&str, u64, u64)] =
    &[("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)];

fn make_device(root: &Path, d: &Device) -> R<()> {
    let target = resolve_in_root(root, &d.path)?;
    if let Some(parent) = target.parent() {
        mkdir_all(parent)?;
    }
    let kind = match d.kind.as_str() {
        "c" | "u" => SFlag::S_IFCHR,
        "b" => SFlag::S_IFBLK,
        _ => SFlag::S_IFIFO,
    };
    let mode = Mode::from_bits_truncate(d.file_mode.unwrap_or(0o666) & 0o7777);
    let dev = makedev(d.major as u64, d.minor as u64);
    let _ = fs::remove_file(&target);
    if let Err(e) = mknod(&target, kind, mode, dev) {
        // Not allowed to make nodes here: bind the guest's node of the same name.
        let guest = Path::new(&d.path);
        if kind == SFlag::S_IFIFO || !guest.exists() {
            return Err(err(format!("cannot create device {}", d.path), e));
        }
        fs::File::create(&target).map_err(|e| err(format!("cannot create {}", target.display()), e))?;
        do_mount(guest.to_str(), &target, None, MsFlags::MS_BIND, None)?;
    }
    nix::unistd::chown(&target, d.uid.map(nix::unistd::Uid::from_raw), d.gid.map(nix::unistd::Gid::from_raw))
        .map_err(|e| err(format!("cannot chown {}", d.path), e))?;
    Ok(())
}

fn dev_is_fresh(mounts: &[Mount]) -> bool {
    mounts.iter().any(|m| m.destination == "/dev" && !parse_options(&m.options).bind && m.kind.as_deref() != Some("bind"))
}

fn setup_dev(root: &Path, plan: &RootfsPlan) -> R<()> {
    if dev_is_fresh(&plan.mounts) {
        for &(name, major, minor) in DEFAULT_DEVICES {
            let d = Device { kind: "c".into(), path: format!("/dev/{name}"), major: major as i64, minor: minor as i64, file_mode: Some(0o666), uid: Some(0), gid: Some(0) };
            make_device(root, &d)?;
        }
        let dev = root.join("dev");
        for (link, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
            ("ptmx", "pts/ptmx"),
        ] {
            let p = dev.join(link);
            let _ = fs::remove_file(&p);
            symlink(target, &p).map_err(|e| err(format!("cannot link /dev/{link}"), e))?;
        }
    }
    for d in &plan.devices {
        make_device(root, d)?;
    }
    Ok(())
}

fn mask(root: &Path, path: &str) -> R<()> {
    let target = resolve_in_root(root, path)?;
    let Ok(meta) = fs::metadata(&target) else { return Ok(()) };
    if meta.is_dir() {
        do_mount(Some("tmpfs"), &target, Some("tmpfs"), MsFlags::MS_RDONLY, Some("size=0"))
    } else {
        do_mount(Some("/dev/null"), &target, None, MsFlags::MS_BIND, None)
    }
}

fn make_readonly(root: &Path, path: &str) -> R<()> {
    let target = resolve_in_root(root, path)?;
    if !target.exists() {
        return Ok(());
    }
    do_mount(target.to_str(), &target, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    do_mount(None, &target, None, flags, None)
        .or_else(|_| do_mount(None, &target, None, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None))
}

/// Makes `root` the process's root: pivot_root where the guest's root allows it,
/// otherwise (the guest's root is the initramfs itself) move it over `/` and chroot.
fn enter_root(root: &Path) -> R<()> {
    nix::unistd::chdir(root).map_err(|e| err(format!("cannot enter {}", root.display()), e))?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            umount2(".", MntFlags::MNT_DETACH).map_err(|e| err("cannot detach the old root", e))?;
        }
        Err(nix::Error::EINVAL) => {
            do_mount(Some("."), Path::new("/"), None, MsFlags::MS_MOVE, None)?;
            nix::unistd::chroot(".").map_err(|e| err("cannot chroot into the rootfs", e))?;
        }
        Err(e) => return Err(err("pivot_root", e)),
    }
    nix::unistd::chdir("/").map_err(|e| err("cannot chdir to /", e))
}

/// Builds the rootfs and enters it. Runs in the helper, in the new mount namespace.
pub fn setup(plan: &RootfsPlan) -> R<()> {
    nix::sys::stat::umask(Mode::empty());
    do_mount(None, Path::new("/"), None, MsFlags::MS_REC | MsFlags::MS_SLAVE, None)?;
    let root = Path::new(&plan.root);
    let meta = fs::metadata(root).map_err(|e| err(format!("root.path {}", plan.root), e))?;
    if !meta.is_dir() {
        return Err(format!("root.path {} is not a directory", plan.root));
    }
    do_mount(Some(&plan.root), root, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
    for m in &plan.mounts {
        mount_one(root, m)?;
    }
    setup_dev(root, plan)?;
    for (key, value) in &plan.sysctl {
        let path = crate::spec::sysctl_path(key).map_err(|e| e.to_string())?;
        fs::write(&path, value).map_err(|e| err(format!("cannot set sysctl {key}"), e))?;
    }
    for p in &plan.masked_paths {
        mask(root, p)?;
    }
    for p in &plan.readonly_paths {
        make_readonly(root, p)?;
    }
    if let Some(p) = plan.propagation.as_deref().filter(|p| !p.is_empty()) {
        do_mount(None, root, None, propagation_flags(p), None)?;
    }
    enter_root(root)?;
    if plan.readonly {
        do_mount(None, Path::new("/"), None, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None)?;
    }
    if let Some(h) = plan.hostname.as_deref().filter(|h| !h.is_empty()) {
        nix::unistd::sethostname(h).map_err(|e| err(format!("cannot set hostname {h:?}"), e))?;
    }
    if let Some(d) = plan.domainname.as_deref().filter(|d| !d.is_empty()) {
        crate::sys::setdomainname(d).map_err(|e| err(format!("cannot set domainname {d:?}"), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_into_flags_and_data() {
        let o = parse_options(&["rbind".into(), "ro".into(), "nosuid".into(), "rprivate".into()]);
        assert!(o.bind && o.recursive);
        assert_eq!(o.flags, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert_eq!(o.propagation, MsFlags::MS_REC | MsFlags::MS_PRIVATE);
        let o = parse_options(&["nosuid".into(), "mode=755".into(), "size=65536k".into(), "ro".into(), "rw".into()]);
        assert_eq!(o.flags, MsFlags::MS_NOSUID);
        assert_eq!(o.data, vec!["mode=755".to_string(), "size=65536k".to_string()]);
        assert!(!o.bind);
    }

    #[test]
    fn paths_resolve_inside_the_root() {
        let dir = std::env::temp_dir().join(format!("moat-resolve-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("usr/lib")).expect("mkdir");
        symlink("/usr/lib", dir.join("lib")).expect("abs link");
        symlink("../../..", dir.join("usr/lib/up")).expect("rel link");
        symlink("/etc", dir.join("escape")).expect("link out");
        assert_eq!(resolve_in_root(&dir, "/lib/x").expect("ok"), dir.join("usr/lib/x"));
        assert_eq!(resolve_in_root(&dir, "/usr/lib/up/etc/passwd").expect("ok"), dir.join("etc/passwd"));
        assert_eq!(resolve_in_root(&dir, "/../../etc").expect("ok"), dir.join("etc"));
        assert_eq!(resolve_in_root(&dir, "/escape/shadow").expect("ok"), dir.join("etc/shadow"));
        symlink("loop", dir.join("loop")).expect("loop");
        assert!(resolve_in_root(&dir, "/loop").is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
