//! `moat-vsock-probe CID:PORT...`: the tests run it inside a container (a static
//! binary, as the test images have no vsock client) to see which vsock addresses
//! a container can reach. For each target it prints one line:
//!
//! - `CID:PORT socket-failed ERRNO`: socket(AF_VSOCK) itself was refused (a seccomp
//!   profile that denies the family);
//! - `CID:PORT connect-failed ERRNO`: the socket was made but the connection failed;
//! - `CID:PORT connected`: the connection was accepted.
//!
//! It exits 0 once every target was tried, 2 on bad arguments.

use std::os::fd::AsRawFd;

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};

fn probe(cid: u32, port: u32) -> String {
    let fd = match socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None) {
        Ok(fd) => fd,
        Err(e) => return format!("{cid}:{port} socket-failed {e:?}"),
    };
    match connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)) {
        Ok(()) => format!("{cid}:{port} connected"),
        Err(e) => format!("{cid}:{port} connect-failed {e:?}"),
    }
}

fn main() {
    let targets: Vec<String> = std::env::args().skip(1).collect();
    if targets.is_empty() {
        eprintln!("usage: moat-vsock-probe CID:PORT...");
        std::process::exit(2);
    }
    for t in &targets {
        let parsed = t.split_once(':').and_then(|(c, p)| Some((c.parse::<u32>().ok()?, p.parse::<u32>().ok()?)));
        let Some((cid, port)) = parsed else {
            eprintln!("moat-vsock-probe: {t:?} is not CID:PORT");
            std::process::exit(2);
        };
        println!("{}", probe(cid, port));
    }
}
