//! moat-vmm's jail (the helper's `vmm` mode), after Firecracker's jailer.
//!
//! The helper runs as root and, before the VMM exists:
//! - joins the pod's host cgroup, so the VM's memory and CPU are charged to the pod;
//! - unshares mount, pid, IPC, UTS and network namespaces (the network namespace is
//!   an empty one of its own until the pod's own network is wired up);
//! - builds the VMM's whole filesystem on a small tmpfs: `/dev/kvm` and `/dev/urandom`
//!   (device nodes of its own, owned by the jail uid), the VMM binary, kernel, initrd
//!   and disks bound read-only (disks writable if asked) at their host paths, and the
//!   pod's `jail/` directory (sockets, console) bound writable; then pivot_roots into
//!   it and remounts it read-only. Container roots, volumes, other pods and the host's
//!   files are not in that mount namespace at all;
//! - sets rlimits (open files, no core dumps, no locked memory);
//! - starts moat-vmm as pid 1 of the new pid namespace, with the jail uid and gid, no
//!   supplementary groups and hence no capabilities; moat-vmm then confines itself
//!   with seccomp once its VM is built.
//!
//! The helper stays as the VMM's parent: it forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT,
//! records the VMM's pid beside its own (so `containerd-shim-moat-v2 delete` finds
//! both), and exits with the VMM's status (128+N if signal N killed it).

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chown, Gid, Pid, Uid};
use rustix::fs::{OFlags, Mode as RMode};
use serde::{Deserialize, Serialize};

use crate::helper::{sys, HelperError};

/// The jail's open-file limit: the vsock muxer's connection cap (1024) with room for
/// the VM's own fds.
pub const JAIL_NOFILE: u64 = 4096;
/// Size of the jail's root tmpfs: it holds empty mount points and two device nodes.
const JAIL_TMPFS: &str = "size=64k,nr_inodes=256,mode=0755";
/// Signals the helper passes on to the VMM.
const FORWARDED: [Signal; 4] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT];

/// A host file the VMM needs, bound at its own path in the jail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailFile {
    pub path: PathBuf,
    pub writable: bool,
}

/// Everything the `vmm` helper needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmmJail {
    /// Die with this process (0: no tie).
    pub parent_pid: i32,
    /// The moat-vmm binary (statically linked: the jail has no libraries).
    pub vmm: PathBuf,
    /// moat-vmm's arguments after argv[0].
    pub args: Vec<OsString>,
    /// The pod's state dir: the VMM's pid is recorded in its `procs` file.
    pub state_dir: PathBuf,
    /// An empty directory the jail's root is built on (in the helper's namespace).
    pub root: PathBuf,
    /// Bound writable at its own path: the VMM's sockets and console.
    pub run_dir: PathBuf,
    /// Bound at their own paths: kernel, initrd, VM config, disks.
    pub files: Vec<JailFile>,
    pub uid: u32,
    pub gid: u32,
    /// The host cgroup directory to join (None: stay in the caller's).
    pub cgroup: Option<PathBuf>,
}

/// Joins `cgroup` (a directory of the cgroup v2 hierarchy): this process and
/// everything it starts.
pub fn join_cgroup(cgroup: &Path) -> Result<(), HelperError> {
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|source| HelperError::Io { what: format!("cannot join cgroup {}", cgroup.display()), source })
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> HelperError {
    move |source| HelperError::Io { what, source }
}

/// Is `path` a statically linked ELF (no program interpreter)? The jail holds no
/// dynamic loader or libraries.
pub fn is_static_elf(path: &Path) -> std::io::Result<bool> {
    let data = std::fs::read(path)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a 64-bit little-endian ELF file");
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return Err(bad());
    }
    let u16at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64at = |o: usize| data.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    let (phoff, phentsize, phnum) = match (u64at(32), u16at(54), u16at(56)) {
        (Some(o), Some(s), Some(n)) => (o as usize, s as usize, n as usize),
        _ => return Err(bad()),
    };
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let off = phoff.checked_add(i.checked_mul(phentsize).ok_or_else(bad)?).ok_or_else(bad)?;
        let kind = data.get(off..off.checked_add(4).ok_or_else(bad)?).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).ok_or_else(bad)?;
        if kind == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Creates `path` in the jail's tmpfs as an empty directory or file (parents too).
fn mount_point(path: &Path, dir: bool) -> Result<(), HelperError> {
    let what = format!("cannot create the mount point {}", path.display());
    if dir {
        std::fs::create_dir_all(path).map_err(io(what))
    } else {
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(io(what.clone()))?;
        }
        std::fs::File::create(path).map(drop).map_err(io(what))
    }
}

/// Binds `src` on `dst` (non-recursively), read-only unless `writable`; no device
/// nodes, no set-user-ID programs through it.
fn bind(src: &Path, dst: &Path, writable: bool) -> Result<(), HelperError> {
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(sys(format!("cannot bind {} into the jail", src.display())))?;
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !writable {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, dst, None::<&str>, flags, None::<&str>).map_err(sys(format!("cannot restrict {} in the jail", dst.display())))
}

/// Builds the jail under `j.root` and pivots into it. The caller is in a fresh mount
/// namespace already.
fn build_root(j: &VmmJail) -> Result<(), HelperError> {
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(sys("cannot make the jail's mounts private"))?;
    let root = &j.root;
    mount(Some("tmpfs"), root, Some("tmpfs"), MsFlags::MS_NOSUID, Some(JAIL_TMPFS))
        .map_err(sys(format!("cannot mount the jail's tmpfs on {}", root.display())))?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    // The two devices the VMM opens, owned by its uid only.
    let dev = root.join("dev");
    std::fs::create_dir_all(&dev).map_err(io("cannot create the jail's /dev".into()))?;
    let (uid, gid) = (Uid::from_raw(j.uid), Gid::from_raw(j.gid));
    for (name, major, minor, mode) in [("kvm", 10, 232, 0o600), ("urandom", 1, 9, 0o444)] {
        let p = dev.join(name);
        mknod(&p, SFlag::S_IFCHR, Mode::from_bits_truncate(mode), makedev(major, minor))
            .map_err(sys(format!("cannot create /dev/{name} in the jail")))?;
        chown(&p, Some(uid), Some(gid)).map_err(sys(format!("cannot give /dev/{name} to the jail's uid")))?;
    }
    let vmm_inside = inside(&j.vmm);
    mount_point(&vmm_inside, false)?;
    bind(&j.vmm, &vmm_inside, false)?;
    for f in &j.files {
        let at = inside(&f.path);
        mount_point(&at, false)?;
        bind(&f.path, &at, f.writable)?;
    }
    let run_inside = inside(&j.run_dir);
    mount_point(&run_inside, true)?;
    bind(&j.run_dir, &run_inside, true)?;
    // pivot_root(".", "."): the old root ends up under the new one and is detached.
    std::env::set_current_dir(root).map_err(io(format!("cannot enter {}", root.display())))?;
    nix::unistd::pivot_root(".", ".").map_err(sys("cannot pivot_root into the jail"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("cannot detach the host's root from the jail"))?;
    std::env::set_current_dir("/").map_err(io("cannot enter the jail's /".into()))?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID, Some(JAIL_TMPFS))
        .map_err(sys("cannot make the jail's root read-only"))?;
    Ok(())
}

fn set_limits() -> Result<(), HelperError> {
    use nix::sys::resource::{setrlimit, Resource};
    for (r, n, what) in [
        (Resource::RLIMIT_NOFILE, JAIL_NOFILE, "open files"),
        (Resource::RLIMIT_CORE, 0, "core dumps"),
        (Resource::RLIMIT_MEMLOCK, 0, "locked memory"),
    ] {
        setrlimit(r, n, n).map_err(sys(format!("cannot limit the jail's {what}")))?;
    }
    Ok(())
}

/// The `vmm` helper: jails and runs moat-vmm, then mirrors its exit.
pub fn run(j: &VmmJail) -> Result<std::convert::Infallible, HelperError> {
    match is_static_elf(&j.vmm) {
        Ok(true) => {}
        Ok(false) => {
            return Err(HelperError::Jail(format!(
                "{} is dynamically linked; the jail holds no libraries (build it static as `make build` does, or set jail = false)",
                j.vmm.display()
            )))
        }
        Err(e) => return Err(HelperError::Io { what: format!("cannot read {}", j.vmm.display()), source: e }),
    }
    if let Some(cg) = &j.cgroup {
        join_cgroup(cg)?;
    }
    // Kept across the pivot: where the VMM's pid is recorded, and the host's /proc to
    // read its start time from.
    let ro = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
    let state = rustix::fs::open(&j.state_dir, ro, RMode::empty()).map_err(|e| HelperError::Io { what: format!("cannot open {}", j.state_dir.display()), source: e.into() })?;
    let proc_fd = rustix::fs::open("/proc", ro, RMode::empty()).map_err(|e| HelperError::Io { what: "cannot open /proc".into(), source: e.into() })?;
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWNET)
        .map_err(sys("cannot create the jail's namespaces"))?;
    build_root(j)?;
    set_limits()?;
    // No threads from here on: after unshare(CLONE_NEWPID) a process cannot make
    // any. One loop waits for the forwarded signals and for SIGCHLD.
    let mut signals = SigSet::empty();
    for s in FORWARDED {
        signals.add(s);
    }
    signals.add(Signal::SIGCHLD);
    signals.thread_block().map_err(sys("cannot block the forwarded signals"))?;
    use std::os::unix::process::CommandExt;
    // std resets the child's signal mask and, as we are root and set a uid, drops
    // every supplementary group before setgid/setuid; the uid change clears every
    // capability.
    let mut child = std::process::Command::new(&j.vmm)
        .args(&j.args)
        .uid(j.uid)
        .gid(j.gid)
        .env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| k == "RUST_LOG" || k == "RUST_BACKTRACE"))
        .spawn()
        .map_err(io(format!("cannot start {} in the jail", j.vmm.display())))?;
    let pid = child.id();
    if let Err(e) = record_pid(&state, &proc_fd, pid) {
        eprintln!("moat helper: cannot record the jailed VMM's pid {pid}: {e}");
    }
    drop((state, proc_fd));
    let target = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            use std::os::unix::process::ExitStatusExt;
            std::process::exit(status.code().or_else(|| status.signal().map(|n| 128 + n)).unwrap_or(1));
        }
        match signals.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = kill(target, sig);
            }
        }
    }
}

/// Appends the VMM's record to the state dir's `procs` file, by fd (the helper no
/// longer sees the host's paths).
fn record_pid(state: &OwnedFd, proc_fd: &OwnedFd, pid: u32) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let stat_fd = rustix::fs::openat(proc_fd, format!("{pid}/stat"), OFlags::RDONLY | OFlags::CLOEXEC, RMode::empty())?;
    let mut stat = String::new();
    std::fs::File::from(stat_fd).read_to_string(&mut stat)?;
    let start = crate::procs::parse_start_time(&stat).ok_or_else(|| std::io::Error::other("unreadable /proc/<pid>/stat"))?;
    let f = rustix::fs::openat(state.as_fd(), crate::procs::PROCS_FILE, OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::CLOEXEC, RMode::from_raw_mode(0o600))?;
    let mut f = std::fs::File::from(f);
    f.write_all(format!("moat-vmm {pid} {start}\n").as_bytes())?;
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_binaries_are_told_apart() {
        // The test binary itself is dynamically linked (cargo's default).
        let me = std::env::current_exe().expect("exe");
        assert!(!is_static_elf(&me).expect("an ELF"));
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("x");
        std::fs::write(&p, b"#!/bin/sh\n").expect("write");
        assert!(is_static_elf(&p).is_err());
        // A minimal static ELF header: no program headers at all.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        std::fs::write(&p, &elf).expect("write");
        assert!(is_static_elf(&p).expect("an ELF"));
        // One PT_INTERP program header.
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes());
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&3u32.to_le_bytes());
        elf.extend(ph);
        std::fs::write(&p, &elf).expect("write");
        assert!(!is_static_elf(&p).expect("an ELF"));
        // A header pointing past the end is an error, not a panic.
        elf[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&p, &elf).expect("write");
        assert!(is_static_elf(&p).is_err());
    }
}
