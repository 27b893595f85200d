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
//! - virtio-fs, when the command line carries `moat.selftest.fs=TAG`: mounts TAG at
//!   [`FS_MOUNT`], reports the content of `from-host.txt`, writes [`FS_MARK`] to
//!   `from-guest.txt`, times a 64 MiB write and read, and unmounts.

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
pub const FS_MOUNT: &str = "/mnt/fs";
pub const FS_MARK: &[u8] = b"written by moat-agent over virtio-fs\n";
const FS_BENCH_MIB: usize = 64;

pub fn run() {
    for line in disks() {
        println!("moat-agent: selftest: {line}");
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(tag) = cmdline.split_ascii_whitespace().find_map(|w| w.strip_prefix("moat.selftest.fs=")) {
        for line in fs_check(tag) {
            println!("moat-agent: selftest: fs {tag}: {line}");
        }
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
        if !crate::peer::admit(conn.as_raw_fd(), ECHO_PORT) {
            continue;
        }
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

/// Mounts the virtio-fs `tag` and exercises it both ways; one report line per step.
fn fs_check(tag: &str) -> Vec<String> {
    use nix::mount::{mount, umount, MsFlags};
    let mut out = Vec::new();
    if let Err(e) = std::fs::create_dir_all(FS_MOUNT) {
        return vec![format!("cannot create {FS_MOUNT}: {e}")];
    }
    if let Err(e) = mount(Some(tag), FS_MOUNT, Some("virtiofs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, None::<&str>) {
        return vec![format!("mount failed: {e}")];
    }
    out.push(format!("mounted at {FS_MOUNT}"));
    let dir = std::path::Path::new(FS_MOUNT);
    match std::fs::read(dir.join("from-host.txt")) {
        Ok(b) => out.push(format!("from-host.txt reads \"{}\"", String::from_utf8_lossy(&b).escape_debug())),
        Err(e) => out.push(format!("from-host.txt read failed: {e}")),
    }
    let write = std::fs::File::create(dir.join("from-guest.txt")).and_then(|mut f| f.write_all(FS_MARK).and_then(|_| f.sync_all()));
    out.push(match write {
        Ok(()) => "from-guest.txt written".to_string(),
        Err(e) => format!("from-guest.txt write failed: {e}"),
    });
    out.push(match fs_bench(&dir.join("bench.bin")) {
        Ok((w, r)) => format!("{FS_BENCH_MIB} MiB sequential write {w:.1} MB/s, read {r:.1} MB/s (page cache dropped)"),
        Err(e) => format!("bench failed: {e}"),
    });
    let _ = std::fs::remove_file(dir.join("bench.bin"));
    out.push(match umount(FS_MOUNT) {
        Ok(()) => "unmounted".to_string(),
        Err(e) => format!("unmount failed: {e}"),
    });
    out
}

/// Writes then reads back a file in 1 MiB blocks; MB/s of each (1 MB = 10^6 bytes).
fn fs_bench(path: &std::path::Path) -> std::io::Result<(f64, f64)> {
    use std::io::Read;
    let block = vec![0x5au8; 1 << 20];
    let start = std::time::Instant::now();
    let mut f = std::fs::File::create(path)?;
    for _ in 0..FS_BENCH_MIB {
        f.write_all(&block)?;
    }
    f.sync_all()?;
    drop(f);
    let write = start.elapsed().as_secs_f64();
    // Read from the host, not from the guest's page cache.
    std::fs::write("/proc/sys/vm/drop_caches", "3")?;
    let start = std::time::Instant::now();
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n;
    }
    let read = start.elapsed().as_secs_f64();
    if total != FS_BENCH_MIB << 20 {
        return Err(std::io::Error::other(format!("read back {total} bytes")));
    }
    let mb = (FS_BENCH_MIB << 20) as f64 / 1e6;
    Ok((mb / write, mb / read))
}
