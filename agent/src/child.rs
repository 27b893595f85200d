//! `moat-agent __init`: the single-threaded helper that turns a [`Launch`] into a
//! running container process. It joins the cgroup and namespaces, forks (so the
//! process is inside a new pid namespace), and in the child builds the rootfs, sets
//! stdio, limits, credentials and seccomp, waits for the start byte and execs. Every
//! failure is reported on the socket from the agent; the agent never sees a panic.

use std::ffi::CString;
use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

use nix::sched::CloneFlags;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::unistd::{Gid, Uid};

use crate::process::{Launch, Namespaces, Report};
use crate::spec::Process;

type R<T> = std::result::Result<T, String>;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

struct Reporter(File);

impl Reporter {
    fn send(&mut self, r: &Report) {
        if let Ok(mut line) = serde_json::to_string(r) {
            line.push('\n');
            let _ = self.0.write_all(line.as_bytes());
        }
    }
}

/// The helper's main: never returns.
pub fn main() -> ! {
    // fd 0 is the socket from the agent. Move it off 0 (close-on-exec), so that 0..2
    // are free for the process's stdio.
    let sock0 = crate::sys::owned_fd(0);
    let sock = match sock0.try_clone() {
        Ok(s) => s,
        Err(_) => std::process::exit(2),
    };
    drop(sock0);
    let mut rep = Reporter(File::from(match sock.try_clone() {
        Ok(s) => s,
        Err(_) => std::process::exit(2),
    }));
    let result = receive(&sock).and_then(|(launch, fds, console)| run(&launch, fds, console, sock, &mut rep));
    if let Err(msg) = result {
        rep.send(&Report::Error(msg));
    }
    std::process::exit(1);
}

/// The launch, the three stdio descriptors and, for a terminal process, the socket
/// the pty's master goes back on.
fn receive(sock: &OwnedFd) -> R<(Launch, [OwnedFd; 3], Option<OwnedFd>)> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(|e| format!("receiving stdio: {e}"))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for c in msg.cmsgs().map_err(|e| format!("receiving stdio: {e}"))? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            fds.extend(raw.into_iter().map(crate::sys::owned_fd));
        }
    }
    let console = if fds.len() == 4 { fds.pop() } else { None };
    let fds: [OwnedFd; 3] = fds.try_into().map_err(|_| "expected three stdio descriptors".to_string())?;
    let mut f = File::from(sock.try_clone().map_err(|e| e.to_string())?);
    let mut len = [0u8; 4];
    f.read_exact(&mut len).map_err(|e| format!("reading the launch: {e}"))?;
    let mut json = vec![0u8; u32::from_le_bytes(len) as usize];
    f.read_exact(&mut json).map_err(|e| format!("reading the launch: {e}"))?;
    let launch: Launch = serde_json::from_slice(&json).map_err(|e| format!("bad launch: {e}"))?;
    if launch.process.terminal != console.is_some() {
        return Err("a terminal process needs a console socket, and only it".into());
    }
    Ok((launch, fds, console))
}

fn ns_flag(kind: &str) -> CloneFlags {
    match kind {
        "pid" => CloneFlags::CLONE_NEWPID,
        "network" | "net" => CloneFlags::CLONE_NEWNET,
        "mount" | "mnt" => CloneFlags::CLONE_NEWNS,
        "ipc" => CloneFlags::CLONE_NEWIPC,
        "uts" => CloneFlags::CLONE_NEWUTS,
        "cgroup" => CloneFlags::CLONE_NEWCGROUP,
        _ => CloneFlags::empty(),
    }
}

fn setns_path(path: &str, kind: &str) -> R<()> {
    let f = File::open(path).map_err(|e| format!("cannot open namespace {path}: {e}"))?;
    nix::sched::setns(f.as_fd(), ns_flag(kind)).map_err(|e| format!("cannot join {kind} namespace {path}: {e}"))
}

fn run(launch: &Launch, fds: [OwnedFd; 3], console: Option<OwnedFd>, sock: OwnedFd, rep: &mut Reporter) -> R<()> {
    std::fs::write(format!("{}/cgroup.procs", launch.cgroup), std::process::id().to_string())
        .map_err(|e| format!("cannot join cgroup {}: {e}", launch.cgroup))?;
    match &launch.namespaces {
        Namespaces::Init { join, new } => {
            for (kind, path) in join {
                setns_path(path, kind)?;
            }
            let flags = new.iter().fold(CloneFlags::empty(), |f, k| f | ns_flag(k));
            nix::sched::unshare(flags).map_err(|e| format!("cannot create namespaces {new:?}: {e}"))?;
        }
        Namespaces::Exec { init_pid } => {
            // Open all first: joining the mount namespace changes what /proc is.
            let kinds = ["cgroup", "ipc", "uts", "net", "pid", "mnt"];
            let mut files = Vec::new();
            for k in kinds {
                let p = format!("/proc/{init_pid}/ns/{k}");
                files.push((k, File::open(&p).map_err(|e| format!("cannot open {p} (container stopped?): {e}"))?));
            }
            for (k, f) in files {
                nix::sched::setns(f.as_fd(), ns_flag(k)).map_err(|e| format!("cannot join the container's {k} namespace: {e}"))?;
            }
        }
    }
    match crate::sys::fork_single_threaded().map_err(|e| format!("fork: {e}"))? {
        nix::unistd::ForkResult::Parent { child } => {
            rep.send(&Report::Pid(child.as_raw()));
            std::process::exit(0);
        }
        nix::unistd::ForkResult::Child => {}
    }
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    if let Some(plan) = &launch.rootfs {
        crate::mounts::setup(plan)?;
    }
    let p = &launch.process;
    if launch.rootfs.is_some() {
        std::fs::create_dir_all(&p.cwd).map_err(|e| format!("cannot create cwd {}: {e}", p.cwd))?;
    }
    nix::unistd::chdir(p.cwd.as_str()).map_err(|e| format!("cannot enter cwd {}: {e}", p.cwd))?;
    let fds = match &console {
        Some(c) => open_console(c, p.user.uid)?,
        None => fds,
    };
    drop(console);
    set_stdio(fds, p.terminal)?;
    limits(p)?;
    let nnp = p.no_new_privileges;
    if let (Some(f), false) = (&launch.seccomp, nnp) {
        crate::sys::install_seccomp(&f.insns, f.flags).map_err(|e| format!("cannot install the seccomp filter: {e}"))?;
    }
    credentials(p)?;
    let env = environment(p);
    // A program that is not there (or not executable by this user) fails the
    // setup, as runc's create does: the manager then never has a created process
    // that cannot start (ctr and Docker clean up after a failed create, not after a
    // failed start).
    let program = match find_program(p, &env) {
        Ok(path) => path,
        Err(errno) => {
            rep.send(&Report::Exec { errno, program: p.args[0].clone() });
            std::process::exit(127);
        }
    };
    rep.send(&Report::Ready);
    let mut start = [0u8; 1];
    let mut f = File::from(sock);
    if f.read(&mut start).map(|n| n != 1).unwrap_or(true) {
        std::process::exit(1); // the agent gave up on this process
    }
    if nnp {
        nix::sys::prctl::set_no_new_privs().map_err(|e| format!("cannot set no_new_privs: {e}"))?;
        if let Some(f) = &launch.seccomp {
            crate::sys::install_seccomp(&f.insns, f.flags).map_err(|e| format!("cannot install the seccomp filter: {e}"))?;
        }
    }
    exec(p, &program, &env, rep)
}

/// Opens a pty in the container's own devpts (its /dev/ptmx, now that the process
/// is in the container's mount namespace), so that the terminal the process gets is
/// one it can find under its /dev/pts: `tty`, ttyname(3) and programs that reopen
/// their terminal work. The master goes back to the agent on `console`; the slave,
/// owned by the process's user, becomes stdin, stdout and stderr.
fn open_console(console: &OwnedFd, uid: u32) -> R<[OwnedFd; 3]> {
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("cannot open /dev/ptmx in the container (is /dev/pts mounted?): {e}"))?;
    grantpt(&master).and_then(|_| unlockpt(&master)).map_err(|e| format!("cannot unlock the container's pty: {e}"))?;
    let name = ptsname_r(&master).map_err(|e| format!("cannot name the container's pty: {e}"))?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&name)
        .map_err(|e| format!("cannot open the container's pty {name}: {e}"))?;
    if uid != 0 {
        nix::unistd::fchown(slave.as_raw_fd(), Some(Uid::from_raw(uid)), None).map_err(|e| format!("cannot give {name} to uid {uid}: {e}"))?;
    }
    let raw = [master.as_raw_fd()];
    nix::sys::socket::sendmsg::<()>(
        console.as_raw_fd(),
        &[std::io::IoSlice::new(b"M")],
        &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| format!("cannot pass the pty to the agent: {e}"))?;
    drop(master);
    let slave = OwnedFd::from(slave);
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("dup {name}: {e}"));
    Ok([dup(&slave)?, dup(&slave)?, slave])
}

/// Puts the process's stdio on 0, 1 and 2.
fn set_stdio(fds: [OwnedFd; 3], terminal: bool) -> R<()> {
    // First above 2, so no dup2 below overwrites a descriptor still to be moved.
    let mut high = Vec::new();
    for fd in &fds {
        let raw = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10)).map_err(|e| format!("dup: {e}"))?;
        high.push(crate::sys::owned_fd(raw));
    }
    drop(fds);
    for (target, fd) in high.iter().enumerate() {
        nix::unistd::dup2(fd.as_raw_fd(), target as RawFd).map_err(|e| format!("dup2 stdio: {e}"))?;
    }
    drop(high);
    if terminal {
        // SAFETY of the borrow: fd 0 is open (dup2 above) for the rest of the process.
        let stdin = std::io::stdin();
        crate::sys::set_controlling_tty(stdin.as_fd()).map_err(|e| format!("cannot set the controlling terminal: {e}"))?;
    }
    Ok(())
}

fn limits(p: &Process) -> R<()> {
    for r in &p.rlimits {
        let res = crate::caps::rlimit_by_name(&r.kind).ok_or_else(|| format!("unknown rlimit {}", r.kind))?;
        nix::sys::resource::setrlimit(res, r.soft, r.hard).map_err(|e| format!("cannot set {}: {e}", r.kind))?;
    }
    if let Some(adj) = p.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string()).map_err(|e| format!("cannot set oomScoreAdj: {e}"))?;
    }
    let umask = p.user.umask.unwrap_or(0o022);
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(umask));
    Ok(())
}

fn credentials(p: &Process) -> R<()> {
    let caps = p.capabilities.as_ref();
    if let Some(c) = caps {
        let bounding = crate::caps::mask(&c.bounding);
        for cap in 0..=crate::caps::last_known() {
            if bounding & (1 << cap) == 0 {
                match crate::sys::capbset_drop(cap) {
                    Ok(()) | Err(nix::Error::EINVAL) => {}
                    Err(e) => return Err(format!("cannot drop capability {cap} from the bounding set: {e}")),
                }
            }
        }
    }
    nix::sys::prctl::set_keepcaps(true).map_err(|e| format!("keepcaps: {e}"))?;
    let groups: Vec<Gid> = p.user.additional_gids.iter().map(|g| Gid::from_raw(*g)).collect();
    nix::unistd::setgroups(&groups).map_err(|e| format!("cannot set supplementary groups: {e}"))?;
    let (uid, gid) = (Uid::from_raw(p.user.uid), Gid::from_raw(p.user.gid));
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("cannot set gid {gid}: {e}"))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("cannot set uid {uid}: {e}"))?;
    nix::sys::prctl::set_keepcaps(false).map_err(|e| format!("keepcaps: {e}"))?;
    match caps {
        Some(c) => {
            let (e, pm, i) = (crate::caps::mask(&c.effective), crate::caps::mask(&c.permitted), crate::caps::mask(&c.inheritable));
            crate::sys::capset(e, pm | e, i).map_err(|err| format!("cannot set capabilities: {err}"))?;
            for name in &c.ambient {
                if let Some(cap) = crate::caps::by_name(name) {
                    // Like runc: an ambient capability the sets do not allow is skipped.
                    let _ = crate::sys::ambient_raise(cap);
                }
            }
        }
        None if p.user.uid != 0 => crate::sys::capset(0, 0, 0).map_err(|e| format!("cannot clear capabilities: {e}"))?,
        None => {}
    }
    Ok(())
}

/// The process's environment, with PATH and HOME filled in when the spec has none.
fn environment(p: &Process) -> Vec<String> {
    let mut env = p.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", home_of(p.user.uid)));
    }
    env
}

fn home_of(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 6 && f[2].parse::<u32>().ok() == Some(uid))
        .map(|f| f[5].to_string())
        .unwrap_or_else(|| "/".into())
}

/// Finds `program` on PATH like execvp: the first executable regular file; EACCES if
/// only non-executable candidates exist, ENOENT if none.
pub fn lookup(program: &str, path: &str) -> Result<String, i32> {
    if program.contains('/') {
        return Ok(program.to_string());
    }
    let mut denied = false;
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = format!("{dir}/{program}");
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {
                if nix::unistd::access(candidate.as_str(), nix::unistd::AccessFlags::X_OK).is_ok() {
                    return Ok(candidate);
                }
                denied = true;
            }
            Ok(_) => denied = true,
            Err(_) => {}
        }
    }
    Err(if denied { libc::EACCES } else { libc::ENOENT })
}

/// The program to execute, looked up as execvp does with the process's PATH; an
/// explicit path must name an executable file. Err: the errno execve would give.
fn find_program(p: &Process, env: &[String]) -> Result<String, i32> {
    let path_env = env.iter().rev().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
    let program = &p.args[0];
    let resolved = lookup(program, path_env)?;
    match std::fs::metadata(&resolved) {
        Err(e) => Err(e.raw_os_error().unwrap_or(libc::ENOENT)),
        Ok(m) if m.is_dir() => Err(libc::EACCES),
        Ok(_) => match nix::unistd::access(resolved.as_str(), nix::unistd::AccessFlags::X_OK) {
            Ok(()) => Ok(resolved),
            Err(e) => Err(e as i32),
        },
    }
}

/// Executes `resolved` (the program [`find_program`] found before setup ended);
/// execve's own failure is reported like the early lookup's.
fn exec(p: &Process, resolved: &str, env: &[String], rep: &mut Reporter) -> R<()> {
    let program = &p.args[0];
    let cstr = |s: &str| CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"));
    let path = cstr(resolved)?;
    let args = p.args.iter().map(|a| cstr(a)).collect::<R<Vec<_>>>()?;
    let envs = env.iter().map(|e| cstr(e)).collect::<R<Vec<_>>>()?;
    crate::sys::reset_signals();
    let Err(e) = nix::unistd::execve(&path, &args, &envs);
    rep.send(&Report::Exec { errno: e as i32, program: program.clone() });
    std::process::exit(if e == nix::Error::ENOENT { 127 } else { 126 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_follows_path_like_execvp() {
        let dir = std::env::temp_dir().join(format!("moat-lookup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a")).expect("mkdir");
        std::fs::create_dir_all(dir.join("b")).expect("mkdir");
        std::fs::write(dir.join("a/tool"), b"#!/bin/sh\n").expect("write");
        std::fs::write(dir.join("b/tool"), b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(dir.join("b/tool"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = format!("{}:{}", dir.join("a").display(), dir.join("b").display());
        assert_eq!(lookup("tool", &path), Ok(format!("{}/tool", dir.join("b").display())));
        assert_eq!(lookup("missing", &path), Err(libc::ENOENT));
        let only_a = dir.join("a").display().to_string();
        assert_eq!(lookup("tool", &only_a), Err(libc::EACCES));
        assert_eq!(lookup("/abs/x", &path), Ok("/abs/x".into()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn environment_fills_path_and_home() {
        let p = Process { env: vec!["A=1".into()], user: crate::spec::User { uid: 4242, ..Default::default() }, ..Default::default() };
        let env = environment(&p);
        assert!(env.contains(&format!("PATH={DEFAULT_PATH}")));
        assert!(env.contains(&"HOME=/".to_string()));
        let p = Process { env: vec!["PATH=/x".into(), "HOME=/h".into()], ..Default::default() };
        assert_eq!(environment(&p), vec!["PATH=/x".to_string(), "HOME=/h".to_string()]);
    }
}
