//! `moat.selftest`: exercises the guest's virtio devices and reports on the console,
//! so the host's tests can check each device end to end from a real guest. It will
//! stay a diagnostic once the agent's vsock API exists.
//!
//! - hwrng: reads 32 bytes from /dev/hwrng (virtio-rng).
//! - vsock, guest to host: connects to host port [`ECHO_PORT`] and sends one line.
//! - vsock, host to guest: serves an echo service on guest port [`ECHO_PORT`], line by
//!   line, until the guest stops.
//! - disks: for each virtio-blk disk, reports its serial, size and read-only flag and
//!   its first 16 bytes; on a writable disk writes [`DISK_MARK`] at byte 512 and
//!   flushes; on a read-only one checks that writing fails.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

pub const ECHO_PORT: u32 = 7;
const HOST_CID: u32 = 2;
const ANY_CID: u32 = u32::MAX;

pub const DISK_MARK: &[u8] = b"written by moat-agent\n";

pub fn run() {
    for line in disks() {
        println!("moat-agent: selftest: {line}");
    }
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

fn disks() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else { return vec!["no /sys/block".into()] };
    let mut names: Vec<String> =
        entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("vd")).collect();
    names.sort();
    names.iter().map(|n| disk_report(n)).collect()
}

fn disk_report(name: &str) -> String {
    use std::os::unix::fs::FileExt;
    let attr = |a: &str| std::fs::read_to_string(format!("/sys/block/{name}/{a}")).unwrap_or_default().trim().to_string();
    let (serial, sectors, ro) = (attr("serial"), attr("size"), attr("ro") == "1");
    let dev = format!("/dev/{name}");
    let mut head = [0u8; 16];
    let start = match std::fs::File::open(&dev).and_then(|f| f.read_exact_at(&mut head, 0)) {
        Ok(()) => String::from_utf8_lossy(&head).escape_debug().to_string(),
        Err(e) => format!("<read failed: {e}>"),
    };
    let write = std::fs::OpenOptions::new()
        .write(true)
        .open(&dev)
        .and_then(|f| f.write_all_at(DISK_MARK, 512).and_then(|_| f.sync_all()));
    let wrote = match (write, ro) {
        (Ok(()), false) => "write ok".to_string(),
        (Err(_), true) => "write refused".to_string(),
        (Ok(()), true) => "WRITE SUCCEEDED ON A READ-ONLY DISK".to_string(),
        (Err(e), false) => format!("write failed: {e}"),
    };
    format!("disk {name} serial {serial} sectors {sectors} ro {} starts \"{start}\" {wrote}", u8::from(ro))
}
