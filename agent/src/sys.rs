//! The agent's only unsafe code: port I/O to the VMM's control port, taking ownership
//! of received descriptors, and the few system calls that build a container's process
//! (fork in the single-threaded helper, capabilities, seccomp, terminal ioctls).
//!
//! Ports (see moat-vmm's `devices/legacy/control.rs`): 0x0f00 takes the ready magic,
//! 0x0f01 a power-off status. Under a VMM without the port (QEMU in the benchmarks),
//! the writes are simply ignored.

const CONTROL_PORT: u16 = 0x0f00;
const READY_MAGIC: u8 = 123;

/// Grants this process access to the two control ports. PID 1 runs as root with every
/// capability, so this fails only on a kernel without ioperm support.
fn enable_ports() -> bool {
    // SAFETY: ioperm only changes this process's I/O permission bitmap; the arguments
    // are plain integers and no memory is passed.
    let r = unsafe { libc::ioperm(libc::c_ulong::from(CONTROL_PORT), 2, 1) };
    r == 0
}

fn outb(port: u16, value: u8) {
    if !enable_ports() {
        println!("moat-agent: cannot reach the VMM control port (ioperm failed)");
        return;
    }
    // SAFETY: `enable_ports` granted this process these two ports, so `out` does not
    // fault; it touches no memory and only reaches the VMM's control device.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    }
}

/// Tells the VMM the agent is up.
pub fn report_ready() {
    outb(CONTROL_PORT, READY_MAGIC);
}

/// Tells the VMM to stop the VM with `status`.
pub fn report_power_off(status: u8) {
    outb(CONTROL_PORT + 1, status);
}

/// Accepts a connection on `listener` as an owned, close-on-exec fd (the agent starts
/// processes from several threads; no connection may leak into them).
pub fn accept_owned(listener: &std::os::fd::OwnedFd) -> nix::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let raw = nix::sys::socket::accept4(listener.as_raw_fd(), nix::sys::socket::SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept(2) just returned `raw` as a new descriptor that nothing else
    // owns or will close.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}

// --- process creation and confinement (used by the single-threaded `__init` helper,
// never by the multi-threaded agent itself, except where noted) ---

/// Forks the calling process.
///
/// Only the `__init` helper calls this, and it is single-threaded (a fresh exec of the
/// agent binary that starts no thread), so the child may run any code: there is no
/// other thread whose locks could be held across the fork.
pub fn fork_single_threaded() -> nix::Result<nix::unistd::ForkResult> {
    // SAFETY: see above: the caller is single-threaded, so the child inherits no lock
    // held by another thread and no allocator state in flux.
    unsafe { nix::unistd::fork() }
}

/// Takes ownership of a descriptor received with SCM_RIGHTS.
pub fn owned_fd(raw: std::os::fd::RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: the kernel just installed `raw` in this process for the SCM_RIGHTS
    // message the caller received; nothing else refers to it or will close it.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) }
}

/// Makes the terminal on `fd` the calling process's controlling terminal
/// (the caller has just called setsid()).
pub fn set_controlling_tty(fd: std::os::fd::BorrowedFd<'_>) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal) and no memory.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY, 0) };
    nix::errno::Errno::result(r).map(drop)
}

/// Sets a terminal's window size (TIOCSWINSZ).
pub fn set_winsize(fd: std::os::fd::BorrowedFd<'_>, rows: u16, cols: u16) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one `struct winsize` from the pointer, which points to
    // a live, initialized local of exactly that type.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws as *const libc::winsize) };
    nix::errno::Errno::result(r).map(drop)
}

/// Sets the calling thread's effective, permitted and inheritable capability sets.
pub fn capset(effective: u64, permitted: u64, inheritable: u64) -> nix::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut hdr = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let lo = |v: u64| v as u32;
    let hi = |v: u64| (v >> 32) as u32;
    let data = [
        Data { effective: lo(effective), permitted: lo(permitted), inheritable: lo(inheritable) },
        Data { effective: hi(effective), permitted: hi(permitted), inheritable: hi(inheritable) },
    ];
    // SAFETY: capset(2) with version 3 reads one header and two data structs; both
    // pointers point to live locals of the kernel's layout (repr(C), u32 fields).
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut Header, data.as_ptr()) };
    nix::errno::Errno::result(r).map(drop)
}

fn prctl5(op: libc::c_int, a: libc::c_ulong, b: libc::c_ulong) -> nix::Result<()> {
    // SAFETY: the prctl operations used here (PR_CAPBSET_DROP, PR_CAP_AMBIENT) take
    // integer arguments only and touch no memory of this process.
    let r = unsafe { libc::prctl(op, a, b, 0 as libc::c_ulong, 0 as libc::c_ulong) };
    nix::errno::Errno::result(r).map(drop)
}

/// Drops capability `cap` from the bounding set.
pub fn capbset_drop(cap: u32) -> nix::Result<()> {
    prctl5(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0)
}

/// Raises capability `cap` in the ambient set.
pub fn ambient_raise(cap: u32) -> nix::Result<()> {
    prctl5(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong, libc::c_ulong::from(cap))
}

/// Installs a seccomp filter on the calling thread. `insns` are (code, jt, jf, k).
pub fn install_seccomp(insns: &[(u16, u8, u8, u32)], flags: u32) -> nix::Result<()> {
    let prog: Vec<libc::sock_filter> =
        insns.iter().map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k }).collect();
    let len = u16::try_from(prog.len()).map_err(|_| nix::Error::E2BIG)?;
    let fprog = libc::sock_fprog { len, filter: prog.as_ptr() as *mut libc::sock_filter };
    // SAFETY: seccomp(2) copies `len` instructions from `fprog.filter`, which points
    // to `prog`, alive until after the call; the kernel validates the program itself.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::c_ulong::from(flags),
            &fprog as *const libc::sock_fprog,
        )
    };
    nix::errno::Errno::result(r).map(drop)
}

/// Sends signal number `sig` (any, real-time ones included) to `pid`.
/// Safe from any thread.
pub fn kill(pid: i32, sig: i32) -> nix::Result<()> {
    // SAFETY: kill(2) takes two integers and touches no memory.
    let r = unsafe { libc::kill(pid, sig) };
    nix::errno::Errno::result(r).map(drop)
}

/// Resets every signal's disposition to the default and empties the signal mask,
/// so the program the helper executes starts clean (the Rust runtime ignores SIGPIPE,
/// and an ignored signal stays ignored across execve).
pub fn reset_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for sig in Signal::iterator() {
        if sig == Signal::SIGKILL || sig == Signal::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL cannot run any handler code, so it cannot break
        // any invariant of this program.
        let _ = unsafe { sigaction(sig, &dfl) };
    }
    let _ = nix::sys::signal::sigprocmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// Sets the NIS domain name of the calling process's UTS namespace.
pub fn setdomainname(name: &str) -> nix::Result<()> {
    // SAFETY: setdomainname(2) reads `name.len()` bytes from the pointer, which
    // points into the live `name`.
    let r = unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) };
    nix::errno::Errno::result(r).map(drop)
}
