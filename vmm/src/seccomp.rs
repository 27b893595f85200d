//! Seccomp filters: once the VM is built, each VMM thread may make only the system
//! calls its job needs. A guest that found a bug in a device still could not open a
//! file, create a socket or exec anything from inside the VMM.
//!
//! Two filters: vCPU threads (KVM_RUN and what routing an exit to a device takes) and
//! the main thread (its poll loop, virtio queue service and shutdown). A call outside
//! the list raises SIGSYS; the handler names the call on stderr and exits with status
//! 1, so a missing entry shows up as a clear failure rather than a silent kill.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

/// `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;
const PROT_EXEC: u64 = libc::PROT_EXEC as u64;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
}

/// Calls every thread makes: memory management (malloc, thread stacks), locks,
/// signal return, time, logging to stderr, exiting.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    // abort() (a panic in a release build) signals its own thread.
    libc::SYS_tgkill,
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

/// The main thread additionally polls, reads eventfds and the signalfd, kicks vCPU
/// threads with a signal, sleeps between kicks, serves disk requests and the vsock muxer's Unix
/// sockets (accept host connections, connect guest-initiated ones to `<uds>_<port>`,
/// remove the socket on exit), and talks vhost-user to virtio-fs backends (sendmsg with
/// SCM_RIGHTS for the memory and eventfds, recvmsg for replies). The guest-memory memfd,
/// the backend connections and every eventfd are made before confinement, so neither
/// memfd_create, ftruncate nor eventfd2 is allowed here.
const MAIN_EXTRA: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_accept4,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_fcntl,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    // virtio-blk requests: positioned reads and writes, flush.
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
];

/// `FIONBIO`: how the standard library makes a socket non-blocking.
const FIONBIO: u64 = 0x5421;

fn filter(extra: &[i64], ioctls: &[u64]) -> Result<BpfProgram, SeccompError> {
    filter_with(extra, ioctls, SeccompAction::Trap)
}

#[cfg(test)]
fn vcpu_filter_with(on_violation: SeccompAction) -> Result<BpfProgram, SeccompError> {
    filter_with(&[], &[KVM_RUN], on_violation)
}

fn filter_with(extra: &[i64], ioctls: &[u64], on_violation: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in COMMON.iter().chain(extra) {
        rules.insert(nr, vec![]);
    }
    // Memory may be mapped or re-protected, but never made executable: no new code
    // can appear in the VMM once it is confined.
    let no_exec = SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(PROT_EXEC), 0)
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(SeccompError::Build)?;
    rules.insert(libc::SYS_mmap, vec![no_exec.clone()]);
    rules.insert(libc::SYS_mprotect, vec![no_exec]);
    if !ioctls.is_empty() {
        let allowed = ioctls
            .iter()
            .map(|&req| {
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, req)
                    .and_then(|c| SeccompRule::new(vec![c]))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(SeccompError::Build)?;
        rules.insert(libc::SYS_ioctl, allowed);
    }
    let f = SeccompFilter::new(rules, on_violation, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SeccompError::Build)?;
    BpfProgram::try_from(f).map_err(SeccompError::Build)
}

/// The filter for vCPU threads.
pub fn vcpu_filter() -> Result<BpfProgram, SeccompError> {
    filter(&[], &[KVM_RUN])
}

/// The filter for the main (event loop) thread.
pub fn main_filter() -> Result<BpfProgram, SeccompError> {
    filter(MAIN_EXTRA, &[FIONBIO])
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
    fn executable_mappings_are_refused() {
        let t = std::thread::spawn(|| {
            // The vCPU filter's rules, but answering EPERM instead of trapping.
            let f = vcpu_filter_with(SeccompAction::Errno(libc::EPERM as u32)).expect("filter");
            install(&f).expect("install");
            let map = |prot| {
                // SAFETY: an anonymous mapping with no address hint, unmapped at once.
                unsafe {
                    let p = libc::mmap(std::ptr::null_mut(), 4096, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
                    if p != libc::MAP_FAILED {
                        libc::munmap(p, 4096);
                    }
                    p != libc::MAP_FAILED
                }
            };
            (map(libc::PROT_READ | libc::PROT_WRITE), map(libc::PROT_READ | libc::PROT_EXEC))
        });
        assert_eq!(t.join().expect("thread"), (true, false));
    }

    #[test]
    fn filter_blocks_what_it_does_not_list() {
        // In a child thread, so the test process keeps its freedom: the vCPU filter
        // refuses an openat (EPERM here, to observe it instead of the SIGSYS handler).
        let t = std::thread::spawn(|| {
            install(&vcpu_filter_with(SeccompAction::Errno(libc::EPERM as u32)).expect("filter")).expect("install");
            std::fs::File::open("/dev/null").err().and_then(|e| e.raw_os_error())
        });
        assert_eq!(t.join().expect("thread"), Some(libc::EPERM));
    }
}
