//! moat's default seccomp profile, in the OCI `linux.seccomp` format moat-agent
//! compiles: what a container gets when its spec brings no profile of its own (ctr's
//! default spec and `moat run` bring none).
//!
//! It is an allowlist: the system calls an ordinary Linux program uses are allowed,
//! everything else fails with EPERM. The list follows the set container engines allow
//! by default (the public facts of which calls are safe for an unprivileged
//! container), with these choices of moat's own:
//! - `socket` only for the families a normal image uses: AF_UNIX, AF_INET, AF_INET6,
//!   AF_NETLINK and AF_PACKET; any other family (AF_VSOCK above all: the agent's
//!   transport) fails with EAFNOSUPPORT, as on a kernel without it. The family is
//!   matched exactly on all 64 bits of the argument, so a value with high bits set
//!   (which the kernel truncates to an int) matches no allowed family.
//! - no io_uring: its requests (IORING_OP_SOCKET among them) are made by the kernel
//!   on the program's behalf, past any filter on the system calls themselves.
//! - `clone` without namespace flags, `clone3` answered ENOSYS (its flags are behind
//!   a pointer no filter can read; libc then falls back to `clone`), no `unshare`,
//!   `setns`, `mount` or other CAP_SYS_ADMIN calls: a container that holds
//!   CAP_SYS_ADMIN is privileged and gets no default profile at all.
//! - calls that need a capability are allowed only when the container's bounding set
//!   holds it ([`CAP_SYSCALLS`]).
//!
//! [`apply_default`] decides: a spec with its own `linux.seccomp` keeps it, a
//! privileged spec (CAP_SYS_ADMIN in `process.capabilities.bounding`, as Docker's
//! --privileged and Kubernetes' privileged containers have; runc runs those
//! unconfined too) gets none, and every other spec gets this profile unless the host
//! config's `default_seccomp` is off.

use serde_json::{json, Value};

/// errno values the profile returns.
const EPERM: u32 = 1;
const ENOSYS: u32 = 38;
const EAFNOSUPPORT: u32 = 97;

/// The address families `socket` accepts: AF_UNIX, AF_INET, AF_INET6, AF_NETLINK,
/// AF_PACKET.
pub const ALLOWED_FAMILIES: &[u64] = &[1, 2, 10, 16, 17];
/// AF_VSOCK, the agent's transport.
pub const AF_VSOCK: u64 = 40;

/// The namespace flags of clone(2): CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER,
/// NEWPID, NEWNET.
const CLONE_NAMESPACE_FLAGS: u64 = 0x0002_0000 | 0x0200_0000 | 0x0400_0000 | 0x0800_0000 | 0x1000_0000 | 0x2000_0000 | 0x4000_0000;

/// personality(2) values allowed: PER_LINUX, PER_LINUX32, UNAME26, UNAME26|PER_LINUX32,
/// and 0xffffffff (which only queries the current one).
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// Allowed for every container, the most frequent first: the agent's filter tests
/// rules in order, so the calls a program makes all the time match early.
pub const ALLOWED: &[&str] = &[
    // The hot path of most programs.
    "read", "write", "futex", "epoll_wait", "epoll_pwait", "epoll_pwait2", "epoll_ctl", "poll", "ppoll", "select",
    "pselect6", "recvfrom", "sendto", "recvmsg", "sendmsg", "readv", "writev", "pread64", "pwrite64", "lseek",
    "close", "mmap", "munmap", "mprotect", "brk", "madvise", "openat", "open", "newfstatat", "fstat", "stat",
    "lstat", "statx", "fcntl", "ioctl", "getdents64", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn",
    "clock_gettime", "clock_nanosleep", "nanosleep", "gettimeofday", "sched_yield", "getpid", "gettid",
    "getuid", "geteuid", "getgid", "getegid", "access", "faccessat", "faccessat2", "dup", "dup2", "dup3",
    "pipe", "pipe2", "wait4", "waitid", "execve", "execveat", "exit", "exit_group", "fork", "vfork",
    // The rest, by name.
    "accept", "accept4", "adjtimex", "alarm", "arch_prctl", "bind", "capget", "capset", "chdir", "chmod",
    "chown", "clock_adjtime", "clock_getres", "close_range", "connect", "copy_file_range", "creat",
    "epoll_create", "epoll_create1", "epoll_ctl_old", "epoll_wait_old", "eventfd", "eventfd2", "fadvise64",
    "fallocate", "fanotify_mark", "fchdir", "fchmod", "fchmodat", "fchown", "fchownat", "fdatasync",
    "fgetxattr", "flistxattr", "flock", "fremovexattr", "fsetxattr", "fstatfs", "fsync", "ftruncate",
    "futex_waitv", "futimesat", "get_robust_list", "get_thread_area", "getcpu", "getcwd", "getdents",
    "getgroups", "getitimer", "getpeername", "getpgid", "getpgrp", "getppid", "getpriority", "getrandom",
    "getresgid", "getresuid", "getrlimit", "getrusage", "getsid", "getsockname", "getsockopt", "getxattr",
    "inotify_add_watch", "inotify_init", "inotify_init1", "inotify_rm_watch", "io_cancel", "io_destroy",
    "io_getevents", "io_pgetevents", "io_setup", "io_submit", "ioprio_get", "ioprio_set", "kill",
    "landlock_add_rule", "landlock_create_ruleset", "landlock_restrict_self", "lchown", "lgetxattr", "link",
    "linkat", "listen", "listxattr", "llistxattr", "lremovexattr", "lsetxattr", "membarrier", "memfd_create",
    "memfd_secret", "mincore", "mkdir", "mkdirat", "mknod", "mknodat", "mlock", "mlock2", "mlockall",
    "mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive", "mq_timedsend", "mq_unlink", "mremap",
    "msgctl", "msgget", "msgrcv", "msgsnd", "msync", "munlock", "munlockall", "name_to_handle_at", "openat2",
    "pause", "pidfd_open", "pidfd_send_signal", "pkey_alloc", "pkey_free", "pkey_mprotect", "prctl",
    "preadv", "preadv2", "prlimit64", "process_mrelease", "process_vm_readv", "process_vm_writev", "ptrace",
    "pwritev", "pwritev2", "readahead", "readlink", "readlinkat", "recvmmsg", "remap_file_pages",
    "removexattr", "rename", "renameat", "renameat2", "restart_syscall", "rmdir", "rseq", "rt_sigpending",
    "rt_sigqueueinfo", "rt_sigsuspend", "rt_sigtimedwait", "rt_tgsigqueueinfo", "sched_get_priority_max",
    "sched_get_priority_min", "sched_getaffinity", "sched_getattr", "sched_getparam", "sched_getscheduler",
    "sched_rr_get_interval", "sched_setaffinity", "sched_setattr", "sched_setparam", "sched_setscheduler",
    "seccomp", "semctl", "semget", "semop", "semtimedop", "sendfile", "sendmmsg", "set_robust_list",
    "set_thread_area", "set_tid_address", "setfsgid", "setfsuid", "setgid", "setgroups", "setitimer",
    "setpgid", "setpriority", "setregid", "setresgid", "setresuid", "setreuid", "setrlimit", "setsid",
    "setsockopt", "setuid", "setxattr", "shmat", "shmctl", "shmdt", "shmget", "shutdown", "sigaltstack",
    "signalfd", "signalfd4", "socketpair", "splice", "statfs", "symlink", "symlinkat", "sync",
    "sync_file_range", "syncfs", "sysinfo", "tee", "tgkill", "time", "timer_create", "timer_delete",
    "timer_getoverrun", "timer_gettime", "timer_settime", "timerfd_create", "timerfd_gettime",
    "timerfd_settime", "times", "tkill", "truncate", "umask", "uname", "unlink", "unlinkat", "utime",
    "utimensat", "utimes", "vmsplice",
];

/// Calls allowed only when the container's bounding set holds the capability they
/// need (the kernel would refuse them without it anyway; the filter keeps the code
/// behind them out of reach too).
pub const CAP_SYSCALLS: &[(&str, &[&str])] = &[
    ("CAP_SYS_CHROOT", &["chroot"]),
    ("CAP_SYS_PTRACE", &["kcmp", "pidfd_getfd", "process_madvise"]),
    ("CAP_SYS_BOOT", &["reboot"]),
    ("CAP_SYS_PACCT", &["acct"]),
    ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
    ("CAP_SYS_TIME", &["settimeofday", "clock_settime"]),
    ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
    ("CAP_SYS_NICE", &["get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"]),
    ("CAP_SYSLOG", &["syslog"]),
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
    ("CAP_BPF", &["bpf"]),
    ("CAP_PERFMON", &["perf_event_open"]),
];

/// The capability that makes a container privileged: it gets no default profile.
pub const PRIVILEGED_CAP: &str = "CAP_SYS_ADMIN";

/// One argument condition.
fn arg(index: u32, op: &str, value: u64, value_two: u64) -> Value {
    json!({"index": index, "value": value, "valueTwo": value_two, "op": op})
}

/// The default profile for a container whose bounding set is `caps`.
pub fn default_profile(caps: &[&str]) -> Value {
    let mut rules = vec![json!({"names": ALLOWED, "action": "SCMP_ACT_ALLOW"})];
    for &family in ALLOWED_FAMILIES {
        rules.push(json!({"names": ["socket"], "action": "SCMP_ACT_ALLOW", "args": [arg(0, "SCMP_CMP_EQ", family, 0)]}));
    }
    rules.push(json!({"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": EAFNOSUPPORT}));
    rules.push(json!({
        "names": ["clone"],
        "action": "SCMP_ACT_ALLOW",
        "args": [arg(0, "SCMP_CMP_MASKED_EQ", CLONE_NAMESPACE_FLAGS, 0)]
    }));
    rules.push(json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}));
    for &p in PERSONALITIES {
        rules.push(json!({"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [arg(0, "SCMP_CMP_EQ", p, 0)]}));
    }
    for (cap, names) in CAP_SYSCALLS {
        if caps.contains(cap) {
            rules.push(json!({"names": names, "action": "SCMP_ACT_ALLOW"}));
        }
    }
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": rules
    })
}

/// What [`apply_default`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The spec got moat's default profile.
    Applied,
    /// The spec has a profile of its own, which it keeps.
    OwnProfile,
    /// The container is privileged (CAP_SYS_ADMIN): no profile.
    Privileged,
    /// The host config turned the default off.
    Disabled,
}

/// The bounding capabilities of an OCI spec's process.
fn bounding(spec: &Value) -> Vec<&str> {
    spec.pointer("/process/capabilities/bounding")
        .and_then(Value::as_array)
        .map(|caps| caps.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Gives `spec` (an OCI runtime spec) moat's default seccomp profile if it has none
/// and is not privileged, and `enabled` (the host config's `default_seccomp`).
pub fn apply_default(spec: &mut Value, enabled: bool) -> Decision {
    if !enabled {
        return Decision::Disabled;
    }
    if spec.pointer("/linux/seccomp").is_some_and(|s| !s.is_null()) {
        return Decision::OwnProfile;
    }
    let caps = bounding(spec);
    if caps.contains(&PRIVILEGED_CAP) {
        return Decision::Privileged;
    }
    let profile = default_profile(&caps);
    let Some(obj) = spec.as_object_mut() else { return Decision::Disabled };
    let linux = obj.entry("linux").or_insert_with(|| json!({}));
    if !linux.is_object() {
        *linux = json!({});
    }
    linux["seccomp"] = profile;
    Decision::Applied
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn spec_with_caps(caps: &[&str]) -> Value {
        json!({"process": {"args": ["sh"], "capabilities": {"bounding": caps, "effective": caps, "permitted": caps}}, "linux": {}})
    }

    const DEFAULT_CAPS: &[&str] = &["CAP_CHOWN", "CAP_NET_RAW", "CAP_SYS_CHROOT", "CAP_KILL"];

    #[test]
    fn a_spec_without_seccomp_gets_the_default() {
        let mut s = spec_with_caps(DEFAULT_CAPS);
        assert_eq!(apply_default(&mut s, true), Decision::Applied);
        assert_eq!(s["linux"]["seccomp"], default_profile(DEFAULT_CAPS));
        assert_eq!(s["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        // No linux object, no capabilities, or a null seccomp: the default too.
        for mut s in [json!({"process": {"args": ["sh"]}}), json!({"linux": {"seccomp": null}}), json!({"linux": "x"})] {
            assert_eq!(apply_default(&mut s, true), Decision::Applied, "{s}");
            assert!(s["linux"]["seccomp"]["syscalls"].is_array(), "{s}");
        }
    }

    #[test]
    fn a_privileged_spec_gets_none() {
        let mut s = spec_with_caps(&["CAP_CHOWN", "CAP_SYS_ADMIN"]);
        assert_eq!(apply_default(&mut s, true), Decision::Privileged);
        assert!(s["linux"].get("seccomp").is_none());
    }

    #[test]
    fn a_spec_with_its_own_profile_keeps_it() {
        let own = json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []});
        let mut s = spec_with_caps(DEFAULT_CAPS);
        s["linux"]["seccomp"] = own.clone();
        assert_eq!(apply_default(&mut s, true), Decision::OwnProfile);
        assert_eq!(s["linux"]["seccomp"], own);
    }

    #[test]
    fn turned_off_in_the_config_leaves_the_spec_alone() {
        let mut s = spec_with_caps(DEFAULT_CAPS);
        let before = s.clone();
        assert_eq!(apply_default(&mut s, false), Decision::Disabled);
        assert_eq!(s, before);
    }

    /// A rule as (names, action, errno, args).
    type Rule = (Vec<String>, String, Option<u64>, Vec<Value>);

    /// The rules, for the checks below.
    fn rules(p: &Value) -> Vec<Rule> {
        p["syscalls"]
            .as_array()
            .expect("syscalls")
            .iter()
            .map(|r| {
                let names = r["names"].as_array().expect("names").iter().map(|n| n.as_str().expect("name").to_string()).collect();
                let args = r.get("args").and_then(Value::as_array).cloned().unwrap_or_default();
                (names, r["action"].as_str().expect("action").to_string(), r.get("errnoRet").and_then(Value::as_u64), args)
            })
            .collect()
    }

    /// What the profile answers for one call, evaluated as the agent's filter does:
    /// the first rule whose name and argument conditions match wins.
    fn verdict(p: &Value, name: &str, args: [u64; 6]) -> (String, Option<u64>) {
        for (names, action, errno, conds) in rules(p) {
            if !names.iter().any(|n| n == name) {
                continue;
            }
            let holds = conds.iter().all(|c| {
                let (i, v, v2) = (c["index"].as_u64().expect("index") as usize, c["value"].as_u64().expect("value"), c["valueTwo"].as_u64().unwrap_or(0));
                match c["op"].as_str().expect("op") {
                    "SCMP_CMP_EQ" => args[i] == v,
                    "SCMP_CMP_MASKED_EQ" => args[i] & v == v2,
                    other => panic!("unexpected op {other}"),
                }
            });
            if holds {
                return (action, errno);
            }
        }
        ("SCMP_ACT_ERRNO".into(), p["defaultErrnoRet"].as_u64())
    }

    fn allowed(p: &Value, name: &str, args: [u64; 6]) -> bool {
        verdict(p, name, args).0 == "SCMP_ACT_ALLOW"
    }

    #[test]
    fn vsock_and_unusual_families_are_denied_the_usual_ones_allowed() {
        let p = default_profile(DEFAULT_CAPS);
        for family in ALLOWED_FAMILIES {
            assert!(allowed(&p, "socket", [*family, 1, 0, 0, 0, 0]), "family {family}");
        }
        assert_eq!(verdict(&p, "socket", [AF_VSOCK, 1, 0, 0, 0, 0]), ("SCMP_ACT_ERRNO".into(), Some(u64::from(EAFNOSUPPORT))));
        // High bits the kernel drops when it reads the int: still AF_VSOCK to the
        // kernel, so it must not pass as anything else.
        assert!(!allowed(&p, "socket", [(1 << 32) | AF_VSOCK, 1, 0, 0, 0, 0]));
        assert!(!allowed(&p, "socket", [(1 << 32) | 1, 1, 0, 0, 0, 0]));
        for family in [0, 3, 4, 5, 9, 15, 29, 38, 39, 44, 45, 46] {
            assert!(!allowed(&p, "socket", [family, 1, 0, 0, 0, 0]), "family {family}");
        }
        for name in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
            assert!(!allowed(&p, name, [0; 6]), "{name}");
        }
    }

    #[test]
    fn namespaces_and_admin_calls_are_denied() {
        let p = default_profile(DEFAULT_CAPS);
        const SIGCHLD: u64 = 17;
        assert!(allowed(&p, "clone", [0x0100_0000 | 0x0020_0000 | SIGCHLD, 0, 0, 0, 0, 0]), "a fork-like clone");
        assert!(allowed(&p, "clone", [0x0001_0f00, 0, 0, 0, 0, 0]), "a thread");
        for flag in [0x0002_0000, 0x0200_0000, 0x0400_0000, 0x0800_0000, 0x1000_0000, 0x2000_0000, 0x4000_0000] {
            assert!(!allowed(&p, "clone", [flag | SIGCHLD, 0, 0, 0, 0, 0]), "clone flag {flag:#x}");
        }
        assert_eq!(verdict(&p, "clone3", [0; 6]), ("SCMP_ACT_ERRNO".into(), Some(u64::from(ENOSYS))));
        for name in ["unshare", "setns", "mount", "umount2", "pivot_root", "keyctl", "add_key", "bpf", "userfaultfd", "kexec_load", "init_module", "open_by_handle_at", "chroot"] {
            let caps: Vec<&str> = DEFAULT_CAPS.iter().copied().filter(|c| *c != "CAP_SYS_CHROOT").collect();
            assert!(!allowed(&default_profile(&caps), name, [0; 6]), "{name}");
        }
        assert!(allowed(&p, "personality", [0xffff_ffff, 0, 0, 0, 0, 0]));
        assert!(!allowed(&p, "personality", [0x0040_0000, 0, 0, 0, 0, 0]), "READ_IMPLIES_EXEC");
    }

    #[test]
    fn capability_calls_follow_the_bounding_set() {
        assert!(allowed(&default_profile(DEFAULT_CAPS), "chroot", [0; 6]));
        assert!(!allowed(&default_profile(&["CAP_CHOWN"]), "chroot", [0; 6]));
        assert!(!allowed(&default_profile(DEFAULT_CAPS), "settimeofday", [0; 6]));
        assert!(allowed(&default_profile(&["CAP_SYS_TIME"]), "settimeofday", [0; 6]));
        assert!(allowed(&default_profile(&["CAP_SYS_PTRACE"]), "pidfd_getfd", [0; 6]));
    }

    #[test]
    fn what_programs_need_is_allowed_once() {
        let p = default_profile(DEFAULT_CAPS);
        for name in ["read", "write", "openat", "execve", "exit_group", "futex", "mmap", "connect", "bind", "ptrace", "wait4"] {
            assert!(allowed(&p, name, [0; 6]), "{name}");
        }
        let mut seen = HashSet::new();
        for name in ALLOWED {
            assert!(seen.insert(*name), "{name} listed twice");
            assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{name}");
        }
        for (_, names) in CAP_SYSCALLS {
            for name in *names {
                assert!(!seen.contains(name), "{name} is both always and capability-bound");
            }
        }
        for name in ["socket", "clone", "clone3", "personality", "io_uring_setup", "unshare"] {
            assert!(!seen.contains(name), "{name} must not be allowed unconditionally");
        }
    }
}
