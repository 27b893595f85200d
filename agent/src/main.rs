//! `moat-agent`: PID 1 inside every moat microVM.
//!
//! It sets up the guest's basic filesystems, tells the VMM it is ready (a write to the
//! VMM's control port, so the VMM can time the boot without watching the console), and
//! then serves the host: the ttrpc API on vsock port 1024 (`api.rs`; `Version` so
//! far). On the kernel command line, `moat.poweroff` powers the guest off as soon as
//! it is ready, and `moat.selftest` exercises the virtio devices first and reports.

mod api;
mod init;
mod selftest;
mod sys;

use std::time::Duration;

fn main() {
    if std::process::id() != 1 {
        eprintln!("moat-agent: must run as PID 1 of a moat guest");
        std::process::exit(2);
    }
    let cmdline = match init::setup() {
        Ok(c) => c,
        Err(e) => {
            println!("moat-agent: guest setup failed: {e}");
            init::power_off(1);
        }
    };
    // The API must be up before the ready line: the host connects once it sees it.
    let _api = match api::serve() {
        Ok(server) => Some(server),
        Err(e) => {
            println!("moat-agent: cannot serve the vsock API: {e}");
            None
        }
    };
    if cmdline.self_test {
        selftest::run();
    }
    println!(
        "moat-agent: ready after {:.3} s uptime, {} CPUs, {} MiB RAM, hwrng {}",
        init::uptime().unwrap_or(f64::NAN),
        init::online_cpus(),
        init::mem_total_mib(),
        init::hwrng()
    );
    sys::report_ready();
    if cmdline.power_off {
        init::power_off(0);
    }
    // PID 1 must never exit (the kernel panics); reap orphans until the host (next
    // issue: over vsock) asks for something.
    loop {
        if !init::reap_children() {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}
