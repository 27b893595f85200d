//! `moat.selftest`: exercises the guest's virtio devices and reports on the console,
//! so the host's tests can check each device end to end from a real guest. It will
//! stay a diagnostic once the agent's vsock API exists.
//!
//! - hwrng: reads 32 bytes from /dev/hwrng (virtio-rng).
//! - vsock, guest to host: connects to host port [`ECHO_PORT`] and sends one line.
//! - vsock, host to guest: serves an echo service on guest port [`ECHO_PORT`], line by
//!   line, until the guest stops.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

pub const ECHO_PORT: u32 = 7;
const HOST_CID: u32 = 2;
const ANY_CID: u32 = u32::MAX;

pub fn run() {
    match crate::init::hwrng_selftest(Duration::from_secs(20)) {
        Ok(n) => println!("moat-agent: selftest: read {n} bytes from /dev/hwrng"),
        Err(e) => println!("moat-agent: selftest: /dev/hwrng failed: {e}"),
    }
    match hello_host() {
        Ok(()) => println!("moat-agent: selftest: vsock hello sent to host port {ECHO_PORT}"),
        Err(e) => println!("moat-agent: selftest: vsock connect to host port {ECHO_PORT} failed: {e}"),
    }
    match listen_echo() {
        Ok(fd) => {
            println!("moat-agent: selftest: vsock echo listening on port {ECHO_PORT}");
            std::thread::spawn(move || serve_echo(fd));
        }
        Err(e) => println!("moat-agent: selftest: vsock listen failed: {e}"),
    }
}

fn vsock_socket() -> nix::Result<OwnedFd> {
    socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
}

fn hello_host() -> nix::Result<()> {
    let fd = vsock_socket()?;
    connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, ECHO_PORT))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(b"hello from moat-agent\n").map_err(|_| nix::Error::EIO)
}

fn listen_echo() -> nix::Result<OwnedFd> {
    let fd = vsock_socket()?;
    bind(fd.as_raw_fd(), &VsockAddr::new(ANY_CID, ECHO_PORT))?;
    listen(&fd, Backlog::new(4)?)?;
    Ok(fd)
}

fn serve_echo(listener: OwnedFd) {
    loop {
        let Ok(conn) = crate::sys::accept_owned(&listener) else { continue };
        std::thread::spawn(move || {
            let stream = std::fs::File::from(conn);
            let Ok(mut out) = stream.try_clone() else { return };
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if out.write_all(format!("{line}\n").as_bytes()).is_err() {
                    break;
                }
            }
        });
    }
}
