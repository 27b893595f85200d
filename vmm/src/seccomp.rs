//! Seccomp filters: once the VM is built, each VMM thread may make only the system
//! calls its job needs, with the arguments its job needs. A guest that found a bug in
//! a device still could not open a file, remove one, create any socket but a Unix
//! stream, signal another process or exec anything from inside the VMM.
//!
//! Two filters: vCPU threads (KVM_RUN and what routing an exit to a device takes) and
//! the main thread (its poll loop, virtio queue service and shutdown). A call outside
//! the list raises SIGSYS; the handler names the call on stderr and exits with status
//! 1, so a missing entry shows up as a clear failure rather than a silent kill.
//!
//! What seccomp cannot check: a filter sees only a call's register arguments, never
//! memory, so the path a `connect` names is not checked here (what the VMM can see
//! of the file system is the jail's business), nor the iovecs of `sendmsg`.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

/// `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;
/// `FIONBIO`: how the standard library makes a socket non-blocking.
const FIONBIO: u64 = 0x5421;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
}

/// Calls every thread makes without condition: memory management (malloc, thread
/// stacks), locks, signal return, time, logging to stderr, exiting. `madvise`,
/// `mremap` and `munmap` only touch the VMM's own mappings.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_write,
    // A vCPU thread closes its vCPU fd when it ends.
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The main thread additionally polls, reads eventfds and the signalfd, sleeps
/// between vCPU kicks, serves disk requests and the vsock muxer's Unix sockets
/// (accept host connections, connect guest-initiated ones to `<uds>_<port>`), and
/// talks vhost-user to virtio-fs backends (sendmsg with SCM_RIGHTS for the memory
/// and eventfds, recvmsg for replies). The guest-memory memfd, the backend
/// connections and every eventfd are made before confinement, so neither
/// memfd_create, ftruncate nor eventfd2 is allowed here; nor is unlink: the VMM
/// leaves its sockets to whoever made their directory (the shim removes it whole).
/// `socket`, `sendto` and `fcntl` are allowed in narrow forms only (`main_rules`).
const MAIN_EXTRA: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    // virtio-blk requests: positioned reads and writes, flush.
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
];

/// `fcntl` commands the main thread may use: reading and setting fd and status
/// flags. Not F_DUPFD (no new fds), F_SETOWN/F_SETSIG (which aim signals at other
/// processes), locks or leases.
const FCNTL_COMMANDS: &[libc::c_int] = &[libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL];

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// `arg` (a 32-bit argument) compared with `value` by `op`.
fn arg32(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(SeccompError::Build)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(SeccompError::Build)
}

/// What every thread may do; `pid` is the VMM's own process id (as this process's pid
/// namespace numbers it, which is what `tgkill` compares).
fn common_rules(pid: u32) -> Result<Rules, SeccompError> {
    let mut rules: Rules = COMMON.iter().map(|&nr| (nr, vec![])).collect();
    // Memory may be mapped or re-protected, but never made executable: no new code
    // can appear in the VMM once it is confined. Only anonymous memory is mapped
    // (malloc); guest memory and files were mapped before confinement.
    let no_exec = || arg32(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0);
    let anonymous = arg32(3, SeccompCmpOp::MaskedEq(libc::MAP_ANONYMOUS as u64), libc::MAP_ANONYMOUS as u64)?;
    rules.insert(libc::SYS_mmap, vec![rule(vec![no_exec()?, anonymous])?]);
    rules.insert(libc::SYS_mprotect, vec![rule(vec![no_exec()?])?]);
    // Signals only within this process: kicking vCPU threads out of KVM_RUN, and
    // abort() (a panic in a release build) signalling its own thread.
    rules.insert(libc::SYS_tgkill, vec![rule(vec![arg32(0, SeccompCmpOp::Eq, u64::from(pid))?])?]);
    Ok(rules)
}

fn allow_ioctls(rules: &mut Rules, ioctls: &[u64]) -> Result<(), SeccompError> {
    let allowed = ioctls
        .iter()
        .map(|&req| rule(vec![arg32(1, SeccompCmpOp::Eq, req)?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_ioctl, allowed);
    Ok(())
}

fn vcpu_rules(pid: u32) -> Result<Rules, SeccompError> {
    let mut rules = common_rules(pid)?;
    allow_ioctls(&mut rules, &[KVM_RUN])?;
    Ok(rules)
}

fn main_rules(pid: u32) -> Result<Rules, SeccompError> {
    let mut rules = common_rules(pid)?;
    for &nr in MAIN_EXTRA {
        rules.insert(nr, vec![]);
    }
    allow_ioctls(&mut rules, &[FIONBIO])?;
    // Unix stream sockets only (the muxer's connections to `<uds>_<port>`), with or
    // without SOCK_CLOEXEC/SOCK_NONBLOCK: no network, netlink, datagram or raw socket.
    let type_mask = !((libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as u32);
    rules.insert(
        libc::SYS_socket,
        vec![rule(vec![
            arg32(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)?,
            arg32(1, SeccompCmpOp::MaskedEq(u64::from(type_mask)), libc::SOCK_STREAM as u64)?,
            arg32(2, SeccompCmpOp::Eq, 0)?,
        ])?],
    );
    // send() on a connected socket (how the standard library writes to one): no
    // destination address.
    let no_address = SeccompCondition::new(4, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0).map_err(SeccompError::Build)?;
    rules.insert(libc::SYS_sendto, vec![rule(vec![no_address])?]);
    let fcntl = FCNTL_COMMANDS
        .iter()
        .map(|&cmd| rule(vec![arg32(1, SeccompCmpOp::Eq, cmd as u64)?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_fcntl, fcntl);
    Ok(rules)
}

fn compile(rules: Rules, on_violation: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let f = SeccompFilter::new(rules, on_violation, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SeccompError::Build)?;
    BpfProgram::try_from(f).map_err(SeccompError::Build)
}

/// The filter for vCPU threads.
pub fn vcpu_filter() -> Result<BpfProgram, SeccompError> {
    compile(vcpu_rules(std::process::id())?, SeccompAction::Trap)
}

/// The filter for the main (event loop) thread.
pub fn main_filter() -> Result<BpfProgram, SeccompError> {
    compile(main_rules(std::process::id())?, SeccompAction::Trap)
}

/// Installs `program` on the calling thread (threads it creates later inherit it).
pub fn install(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program).map_err(SeccompError::Install)
}

/// Installs the SIGSYS handler that reports a blocked call.
pub fn install_violation_handler() -> Result<(), SeccompError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys).map_err(SeccompError::Handler)
}

extern "C" fn on_sigsys(_: libc::c_int, _: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid ucontext_t for the
    // interrupted thread; at a seccomp trap RAX holds the system call number.
    let nr = unsafe { (*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RAX as usize] };
    let (msg, len) = violation_message(nr);
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `msg` is a live buffer of
    // at least `len` bytes.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), len);
        libc::_exit(1);
    }
}

/// "moat-vmm: seccomp blocked system call N\n", built without allocating (it runs in a
/// signal handler).
fn violation_message(nr: i64) -> ([u8; 64], usize) {
    let mut out = [b' '; 64];
    let prefix = b"moat-vmm: seccomp blocked system call ";
    out[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 20];
    let mut n = nr.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut pos = prefix.len();
    for i in (0..len).rev() {
        out[pos] = digits[i];
        pos += 1;
    }
    out[pos] = b'\n';
    (out, pos + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::{UnixListener, UnixStream};

    use nix::sys::socket::{socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType};

    const EPERM: i32 = libc::EPERM;
    /// `F_SETSIG` (Linux's fcntl.h; the libc crate does not export it).
    const F_SETSIG: libc::c_int = 10;

    /// Runs `f` on a new thread confined by `rules`, answering EPERM instead of
    /// trapping so that a refused call can be observed; the test process itself
    /// stays free.
    fn confined<T: Send + 'static>(rules: fn(u32) -> Result<Rules, SeccompError>, f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            let program = compile(rules(std::process::id()).expect("rules"), SeccompAction::Errno(EPERM as u32));
            install(&program.expect("filter")).expect("install");
            f()
        })
        .join()
        .expect("confined thread")
    }

    fn errno<T>(r: nix::Result<T>) -> Option<i32> {
        r.err().map(|e| e as i32)
    }

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("moat-seccomp-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn filters_compile() {
        assert!(!vcpu_filter().expect("vcpu filter").is_empty());
        assert!(!main_filter().expect("main filter").is_empty());
    }

    #[test]
    fn message_names_the_call() {
        let (m, len) = violation_message(257);
        let text = std::str::from_utf8(&m[..len]).expect("ascii");
        assert_eq!(text, "moat-vmm: seccomp blocked system call 257\n");
    }

    #[test]
    fn mappings_are_anonymous_and_never_executable() {
        let file = std::fs::File::open("/dev/zero").expect("/dev/zero");
        for rules in [vcpu_rules, main_rules] {
            let fd = file.as_raw_fd();
            let got = confined(rules, move || {
                let map = |prot, flags, fd| {
                    // SAFETY: a new mapping with no address hint (never MAP_FIXED), of a
                    // file this test keeps open or of anonymous memory, unmapped at once.
                    unsafe {
                        let p = libc::mmap(std::ptr::null_mut(), 4096, prot, flags, fd, 0);
                        if p != libc::MAP_FAILED {
                            libc::munmap(p, 4096);
                        }
                        p != libc::MAP_FAILED
                    }
                };
                let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
                [
                    map(libc::PROT_READ | libc::PROT_WRITE, anon, -1),
                    map(libc::PROT_READ | libc::PROT_EXEC, anon, -1),
                    map(libc::PROT_READ, libc::MAP_PRIVATE, fd),
                ]
            });
            assert_eq!(got, [true, false, false], "anonymous, executable, file-backed");
        }
    }

    #[test]
    fn filter_blocks_what_it_does_not_list() {
        let got = confined(vcpu_rules, || std::fs::File::open("/dev/null").err().and_then(|e| e.raw_os_error()));
        assert_eq!(got, Some(EPERM));
    }

    #[test]
    fn sockets_are_unix_streams_only() {
        let (refused, allowed) = confined(main_rules, || {
            let s = |family, kind, flags, protocol| errno(socket(family, kind, flags, protocol));
            let none = SockFlag::empty();
            let refused = [
                s(AddressFamily::Inet, SockType::Stream, none, None),
                s(AddressFamily::Inet6, SockType::Datagram, none, None),
                s(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, Some(SockProtocol::NetlinkRoute)),
                s(AddressFamily::Vsock, SockType::Stream, none, None),
                s(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None),
                s(AddressFamily::Unix, SockType::SeqPacket, none, None),
            ];
            let allowed = [
                s(AddressFamily::Unix, SockType::Stream, none, None),
                s(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None),
                s(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None),
            ];
            (refused, allowed)
        });
        assert_eq!(refused, [Some(EPERM); 6], "INET, INET6, NETLINK, VSOCK, Unix datagram, Unix seqpacket");
        assert_eq!(allowed, [None; 3]);
        // The vCPU threads may create none at all.
        let vcpu = confined(vcpu_rules, || errno(socket(AddressFamily::Unix, SockType::Stream, SockFlag::empty(), None)));
        assert_eq!(vcpu, Some(EPERM));
    }

    #[test]
    fn signals_stay_inside_the_process() {
        let mut child = std::process::Command::new("sleep").arg("60").spawn().expect("a child process");
        let other = child.id() as libc::pid_t;
        for rules in [vcpu_rules, main_rules] {
            let (to_other, to_self) = confined(rules, move || {
                let tgkill = |tgid: libc::pid_t, tid: libc::pid_t| {
                    // SAFETY: tgkill takes plain integers and touches no memory; signal
                    // 0 only checks that the thread exists and may be signalled.
                    let r = unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid, 0) };
                    (r != 0).then(|| std::io::Error::last_os_error().raw_os_error()).flatten()
                };
                (tgkill(other, other), tgkill(std::process::id() as libc::pid_t, nix::unistd::gettid().as_raw()))
            });
            assert_eq!(to_other, Some(EPERM), "another process");
            assert_eq!(to_self, None, "a thread of this process");
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn nothing_is_unlinked() {
        let dir = scratch("unlink");
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, b"").expect("a");
        std::fs::write(&b, b"").expect("b");
        let (pa, pb) = (a.clone(), b.clone());
        let got = confined(main_rules, move || {
            let unlink = std::fs::remove_file(&pa).err().and_then(|e| e.raw_os_error());
            let unlinkat = errno(nix::unistd::unlinkat(None, &pb, nix::unistd::UnlinkatFlags::NoRemoveDir));
            (unlink, unlinkat)
        });
        assert_eq!(got, (Some(EPERM), Some(EPERM)));
        assert!(a.exists() && b.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sends_name_no_address_and_fcntl_is_narrow() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        let fd = a.as_raw_fd();
        let got = confined(main_rules, move || {
            let to = nix::sys::socket::UnixAddr::new("/nonexistent/socket").expect("address");
            let send = errno(nix::sys::socket::send(fd, b"x", MsgFlags::MSG_NOSIGNAL));
            let sendto = errno(nix::sys::socket::sendto(fd, b"y", &to, MsgFlags::MSG_NOSIGNAL));
            let fcntl = |cmd, arg: libc::c_int| {
                // SAFETY: fcntl on an open fd with an integer argument touches no memory.
                let r = unsafe { libc::fcntl(fd, cmd, arg) };
                (r < 0).then(|| std::io::Error::last_os_error().raw_os_error()).flatten()
            };
            let allowed = [fcntl(libc::F_GETFL, 0), fcntl(libc::F_SETFL, libc::O_NONBLOCK), fcntl(libc::F_GETFD, 0)];
            let refused = [fcntl(libc::F_DUPFD_CLOEXEC, 0), fcntl(libc::F_SETOWN, 1), fcntl(F_SETSIG, libc::SIGKILL)];
            drop(a);
            (send, sendto, allowed, refused)
        });
        assert_eq!(got, (None, Some(EPERM), [None; 3], [Some(EPERM); 3]));
        let mut sent = Vec::new();
        b.read_to_end(&mut sent).expect("read");
        assert_eq!(sent, b"x");
    }

    /// The other half: what the main thread does once confined still works. The
    /// muxer (host- and guest-initiated connections), vhost-user messages carrying
    /// fds, disk I/O and eventfds, with everything made before confinement that the
    /// VMM makes before it.
    #[test]
    fn main_thread_work_passes_its_filter() {
        use crate::devices::virtio::vsock::connection::HOST_CID;
        use crate::devices::virtio::vsock::muxer::Muxer;
        use crate::devices::virtio::vsock::packet::{TxPacket, VsockHeader, OP_REQUEST, OP_RESPONSE, OP_RW, TYPE_STREAM};
        use std::os::unix::fs::FileExt;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;

        let dir = scratch("works");
        let uds = dir.join("v.sock");
        let target = UnixListener::bind(dir.join("v.sock_5000")).expect("guest-port listener");
        let disk = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(dir.join("disk")).expect("disk");
        let (frontend, backend) = UnixStream::pair().expect("vhost-user stand-in");
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let path = uds.clone();
        let mut muxer = Muxer::new(&path, 3, crate::devices::virtio::vsock::muxer::MAX_CONNECTIONS).expect("muxer");
        let result = confined(main_rules, move || -> Result<(), String> {
            let hdr = |op, src_port, dst_port| VsockHeader {
                src_cid: 3,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                type_: TYPE_STREAM,
                op,
                buf_alloc: 64 * 1024,
                ..Default::default()
            };
            let pump = |m: &mut Muxer| {
                for (fd, r, w) in m.fds() {
                    m.ready(fd, crate::devices::virtio::Readiness { readable: r, writable: w, hangup: false });
                }
            };
            // Host-initiated: a client connects and asks for guest port 1024.
            let mut host = UnixStream::connect(&path).map_err(|e| format!("connect: {e}"))?;
            host.write_all(b"CONNECT 1024\n").map_err(|e| format!("CONNECT: {e}"))?;
            pump(&mut muxer);
            pump(&mut muxer);
            let (req, _) = muxer.pop_rx().ok_or("no REQUEST for the guest")?;
            let local = req.src_port;
            muxer.from_guest(TxPacket { hdr: hdr(OP_RESPONSE, 1024, local), payload: vec![] });
            let mut ok = [0u8; 32];
            let n = host.read(&mut ok).map_err(|e| format!("OK line: {e}"))?;
            if !ok[..n].starts_with(b"OK ") {
                return Err(format!("handshake reply {:?}", String::from_utf8_lossy(&ok[..n])));
            }
            muxer.from_guest(TxPacket { hdr: hdr(OP_RW, 1024, local), payload: b"to host".to_vec() });
            let mut got = [0u8; 7];
            host.read_exact(&mut got).map_err(|e| format!("host read: {e}"))?;
            // Guest-initiated: a connection to `<uds>_5000`.
            muxer.from_guest(TxPacket { hdr: hdr(OP_REQUEST, 2000, 5000), payload: vec![] });
            if !std::iter::from_fn(|| muxer.pop_rx()).any(|(h, _)| h.op == OP_RESPONSE) {
                return Err("the guest's REQUEST got no RESPONSE".into());
            }
            let (mut peer, _) = target.accept().map_err(|e| format!("accept: {e}"))?;
            muxer.from_guest(TxPacket { hdr: hdr(OP_RW, 2000, 5000), payload: b"log".to_vec() });
            let mut got = [0u8; 3];
            peer.read_exact(&mut got).map_err(|e| format!("guest-port read: {e}"))?;
            // vhost-user: a message carrying an fd, and the reply.
            frontend.send_with_fd(&[1u8, 2, 3][..], evt.as_raw_fd()).map_err(|e| format!("sendmsg: {e}"))?;
            let mut buf = [0u8; 3];
            let (n, file) = backend.recv_with_fd(&mut buf).map_err(|e| format!("recvmsg: {e}"))?;
            if n != 3 || file.is_none() {
                return Err("the fd did not arrive".into());
            }
            // virtio-blk: positioned I/O and flush; eventfds; sleeping between kicks.
            disk.write_all_at(&[7u8; 512], 512).map_err(|e| format!("pwrite: {e}"))?;
            let mut sector = [0u8; 512];
            disk.read_exact_at(&mut sector, 512).map_err(|e| format!("pread: {e}"))?;
            disk.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
            evt.write(1).map_err(|e| format!("eventfd write: {e}"))?;
            evt.read().map_err(|e| format!("eventfd read: {e}"))?;
            std::thread::sleep(std::time::Duration::from_millis(1));
            drop(muxer);
            Ok(())
        });
        let _ = std::fs::remove_dir_all(&dir);
        result.expect("confined main-thread work");
    }
}
