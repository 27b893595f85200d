//! `moat-agent`: PID 1 inside every moat microVM.
//!
//! It sets up the guest's basic filesystems, tells the VMM it is ready (a write to the
//! VMM's control port, so the VMM can time the boot without watching the console), and
//! then serves the host: the ttrpc API on vsock port 1024 (`api.rs`), stdio streams
//! (`io.rs`) and its own log (`logger.rs`), to the host's CID only (`peer.rs`). Containers are built by re-executing this
//! binary as `moat-agent __init` (`child.rs`), so the multi-threaded agent never runs
//! anything complex after a fork. On the kernel command line, `moat.poweroff` powers
//! the guest off as soon as it is ready, and `moat.selftest` exercises the virtio
//! devices first and reports.

mod api;
mod caps;
mod cgroup;
mod child;
mod container;
mod error;
mod init;
mod io;
mod logger;
mod mounts;
mod peer;
mod process;
mod reaper;
mod seccomp;
mod selftest;
mod spec;
mod storage;
mod syscalls;
mod sys;

fn main() {
    if std::env::args().nth(1).as_deref() == Some(process::HELPER_ARG) {
        child::main();
    }
    if std::process::id() != 1 {
        eprintln!("moat-agent: must run as PID 1 of a moat guest");
        std::process::exit(2);
    }
    // Before any thread exists, so that every thread inherits the blocked SIGCHLD and
    // only the reaper's signalfd sees it.
    if let Err(e) = reaper::block_sigchld() {
        println!("moat-agent: cannot block SIGCHLD: {e}");
    }
    let cmdline = match init::setup() {
        Ok(c) => c,
        Err(e) => {
            println!("moat-agent: guest setup failed: {e}");
            init::power_off(1);
        }
    };
    logger::init();
    if let Err(e) = reaper::start() {
        log::error!("cannot start the reaper: {e}");
    }
    if let Err(e) = cgroup::setup() {
        log::error!("cannot set up cgroups for containers: {e}");
    }
    if let Err(e) = io::serve() {
        log::error!("cannot serve stdio streams: {e}");
    }
    // The API must be up before the ready line: the host connects once it sees it.
    let _api = match api::serve() {
        Ok(server) => Some(server),
        Err(e) => {
            log::error!("cannot serve the vsock API: {e}");
            None
        }
    };
    if cmdline.self_test {
        selftest::run();
    }
    log::info!(
        "ready after {:.3} s uptime, {} CPUs, {} MiB RAM, hwrng {}",
        init::uptime().unwrap_or(f64::NAN),
        init::online_cpus(),
        init::mem_total_mib(),
        init::hwrng()
    );
    sys::report_ready();
    if cmdline.power_off {
        init::power_off(0);
    }
    // PID 1 must never exit (the kernel panics); the reaper thread collects orphans.
    loop {
        std::thread::park();
    }
}
