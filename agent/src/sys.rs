//! The agent's only unsafe code: port I/O to the VMM's control port, and taking
//! ownership of accepted sockets.
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

/// Accepts a connection on `listener` as an owned fd.
pub fn accept_owned(listener: &std::os::fd::OwnedFd) -> nix::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let raw = nix::sys::socket::accept(listener.as_raw_fd())?;
    // SAFETY: accept(2) just returned `raw` as a new descriptor that nothing else
    // owns or will close.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}
