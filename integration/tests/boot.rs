//! Boot moat's own guest (the project's kernel and initramfs) with moat-vmm on a KVM
//! that boots Linux, and check the bad configurations fail cleanly.
//!
//! Tests marked `#[ignore]` boot Linux: `make test-kvm` runs them with
//! `--include-ignored` through integration/testhost. The others only need moat-vmm
//! and run anywhere.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use moat_config::DEFAULT_CMDLINE;
use moat_integration::{artifact, kvm_boots_linux};

/// Generous: inside the emulated test host a boot takes seconds, not milliseconds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn vmm() -> PathBuf {
    artifact("moat-vmm")
}

fn require_kvm_that_boots_linux() {
    assert!(
        kvm_boots_linux(),
        "this test boots Linux and /dev/kvm here cannot (missing or PVM); run it through `make test-kvm`"
    );
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait for moat-vmm") {
            return Some(s);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn collect(mut child: Child, status: ExitStatus) -> Run {
    let mut stdout = String::new();
    let mut stderr = String::new();
    child.stdout.take().expect("stdout").read_to_string(&mut stdout).expect("read stdout");
    child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read stderr");
    Run { status, stdout, stderr }
}

fn spawn(args: &[String]) -> Child {
    Command::new(vmm())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", vmm().display()))
}

/// Runs moat-vmm to completion. The emulated host occasionally freezes a nested guest
/// (see ../shared/kvm-in-tcg/README.md), so a run that times out is retried once, loudly.
fn run_vmm(args: &[String]) -> Run {
    for attempt in 1..=2 {
        let mut child = spawn(args);
        // Drain pipes in the background would be needed for huge output; boot output
        // is a few KiB, well under the pipe buffer.
        match wait_with_timeout(&mut child, BOOT_TIMEOUT) {
            Some(status) => return collect(child, status),
            None => eprintln!("*** moat-vmm {args:?} timed out (attempt {attempt}); retrying once ***"),
        }
    }
    panic!("moat-vmm {args:?} timed out twice");
}

fn boot_args(vcpus: u8, memory_mib: u32, extra_cmdline: &str) -> Vec<String> {
    vec![
        "--kernel".into(),
        artifact("vmlinux").display().to_string(),
        "--initrd".into(),
        artifact("initramfs.cpio.gz").display().to_string(),
        "--vcpus".into(),
        vcpus.to_string(),
        "--memory".into(),
        memory_mib.to_string(),
        "--cmdline".into(),
        format!("{DEFAULT_CMDLINE} {extra_cmdline}"),
    ]
}

fn assert_boots(vcpus: u8, memory_mib: u32) {
    require_kvm_that_boots_linux();
    let r = run_vmm(&boot_args(vcpus, memory_mib, "moat.selftest moat.poweroff"));
    assert!(r.status.success(), "moat-vmm failed: {:?}\nstdout:\n{}\nstderr:\n{}", r.status, r.stdout, r.stderr);
    let ready = r
        .stdout
        .lines()
        .find(|l| l.starts_with("moat-agent: ready after"))
        .unwrap_or_else(|| panic!("no ready line on the console:\n{}\nstderr:\n{}", r.stdout, r.stderr))
        .to_string();
    assert!(ready.contains(&format!(", {vcpus} CPUs,")), "guest saw the wrong CPU count: {ready}\n{}", r.stdout);
    check_boot(&r, &ready, vcpus, memory_mib);
}

fn check_boot(r: &Run, ready: &str, vcpus: u8, memory_mib: u32) {
    // MemTotal is RAM minus what the kernel keeps for itself: between 80% and 100%.
    let mib: u64 = ready
        .split(", ")
        .find_map(|p| p.strip_suffix(" MiB RAM"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no memory size in {ready}"));
    assert!(mib <= u64::from(memory_mib) && mib * 10 >= u64::from(memory_mib) * 8, "{mib} MiB of {memory_mib}: {ready}");
    assert!(ready.ends_with(", hwrng virtio_rng.0"), "virtio-rng not in use: {ready}");
    assert!(
        r.stdout.contains("moat-agent: selftest: read 32 bytes from /dev/hwrng"),
        "virtio-rng data path failed:\n{}",
        r.stdout
    );
    assert!(r.stderr.contains("guest ready"), "the VMM did not see the agent's ready write:\n{}", r.stderr);
    assert!(r.stderr.contains("guest powered off"), "{}", r.stderr);
    println!("{vcpus} vCPU / {memory_mib} MiB: {ready}");
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn boots_1_vcpu_128_mib() {
    assert_boots(1, 128);
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn boots_2_vcpus_1024_mib() {
    assert_boots(2, 1024);
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn boots_bzimage_too() {
    require_kvm_that_boots_linux();
    let mut args = boot_args(1, 128, "moat.poweroff");
    args[1] = artifact("bzImage").display().to_string();
    let r = run_vmm(&args);
    assert!(r.status.success(), "{:?}\n{}\n{}", r.status, r.stdout, r.stderr);
    assert!(r.stdout.contains("moat-agent: ready after"), "{}", r.stdout);
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn sigterm_stops_a_running_guest() {
    require_kvm_that_boots_linux();
    // No moat.poweroff: the guest stays up until the VMM is told to stop.
    let mut child = spawn(&boot_args(1, 128, ""));
    let pid = child.id() as libc::pid_t;
    // Wait for the agent to be up, then stop the VMM.
    let start = Instant::now();
    let mut out = child.stdout.take().expect("stdout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("moat-agent: ready") {
        assert!(start.elapsed() < BOOT_TIMEOUT, "guest did not come up: {}", String::from_utf8_lossy(&seen));
        let n = out.read(&mut buf).expect("read console");
        assert!(n > 0, "console closed before ready: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    send_signal(pid, libc::SIGTERM);
    let status = wait_with_timeout(&mut child, Duration::from_secs(30)).expect("moat-vmm did not stop on SIGTERM");
    assert_eq!(status.code(), Some(143), "SIGTERM exit status");
    // The VMM process is gone, so its vCPU threads and VM are too.
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

/// Sends a signal through the `kill` command, which keeps this crate free of unsafe.
fn send_signal(pid: libc::pid_t, sig: i32) {
    let s = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("run kill");
    assert!(s.success(), "kill -{sig} {pid} failed");
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn guest_panic_is_a_reset_not_a_hang() {
    require_kvm_that_boots_linux();
    // An init that does not exist: the kernel panics, panic=-1 reboots, reboot=k hits
    // the i8042 reset line, and the VMM reports a reset (exit 3).
    let r = run_vmm(&boot_args(1, 128, "rdinit=/does-not-exist init=/does-not-exist"));
    assert_eq!(r.status.code(), Some(3), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("guest reset without powering off"), "{}", r.stderr);
}

#[test]
#[ignore = "needs hardware KVM (PVM cannot deliver real-mode exceptions): run through `make test-kvm`"]
fn a_triple_fault_is_a_crash_not_a_reset() {
    require_kvm_that_boots_linux();
    // A tiny real-mode guest: lidt with a zero limit, then int 3. The #BP cannot be
    // delivered (#GP), nor can that (#DF), so the CPU shuts down: KVM_EXIT_SHUTDOWN,
    // which must not read as a reboot the guest asked for.
    let idt_at = 0x1000u16 + 8; // the zero descriptor after the 8 bytes of code
    let mut code = vec![0x0f, 0x01, 0x1e]; // lidt [idt_at]
    code.extend_from_slice(&idt_at.to_le_bytes());
    code.extend_from_slice(&[0xcd, 0x03, 0xf4]); // int 3; hlt (never reached)
    assert_eq!(code.len(), 8);
    code.extend_from_slice(&[0; 6]);
    let vm = moat_vmm::Microvm::with_test_code(&code, 32, moat_vmm::SerialSink::with(None)).expect("build test VM");
    let outcome = vm.run().expect("run test VM");
    assert_eq!(outcome.reason, moat_vmm::StopReason::TripleFault(0));
}

// --- bad configurations: no guest boots, so these run on any host with moat-vmm ---

fn bad(args: &[&str]) -> Run {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let child = spawn(&args);
    let mut child = child;
    let status = wait_with_timeout(&mut child, Duration::from_secs(30)).expect("bad config must fail fast");
    collect(child, status)
}

fn assert_refused(r: &Run, code: i32, message: &str) {
    assert_eq!(r.status.code(), Some(code), "stderr: {}", r.stderr);
    assert!(r.stderr.contains(message), "expected {message:?} in: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert_eq!(r.stderr.lines().filter(|l| l.starts_with("moat-vmm:")).count(), 1, "one error line: {}", r.stderr);
}

#[test]
fn missing_kernel_is_named() {
    let r = bad(&["--kernel", "/nonexistent/vmlinux"]);
    assert_refused(&r, 2, "kernel /nonexistent/vmlinux is not usable");
}

#[test]
fn garbage_kernel_is_refused() {
    assert!(Path::new("/dev/kvm").exists(), "/dev/kvm is missing");
    let path = std::env::temp_dir().join(format!("moat-garbage-{}", std::process::id()));
    std::fs::write(&path, vec![0x42u8; 1 << 16]).expect("write garbage");
    let r = bad(&["--kernel", path.to_str().expect("utf-8 path")]);
    let _ = std::fs::remove_file(&path);
    assert_refused(&r, 2, "cannot be loaded: it is not an ELF vmlinux or a bzImage");
}

#[test]
fn too_little_memory_is_refused() {
    let r = bad(&["--kernel", "/nonexistent", "--memory", "16"]);
    assert_refused(&r, 2, "memory_mib must be between 32 and 262144 MiB, got 16");
}

#[test]
fn too_many_vcpus_are_refused() {
    let r = bad(&["--kernel", "/nonexistent", "--vcpus", "65"]);
    assert_refused(&r, 2, "vcpus must be between 1 and 64, got 65");
    let r = bad(&["--kernel", "/nonexistent", "--vcpus", "0"]);
    assert_refused(&r, 2, "vcpus must be between 1 and 64, got 0");
}

#[test]
fn initrd_larger_than_memory_is_refused() {
    assert!(Path::new("/dev/kvm").exists(), "/dev/kvm is missing");
    let path = std::env::temp_dir().join(format!("moat-big-initrd-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; 40 << 20]).expect("write initrd");
    let kernel = artifact("vmlinux").display().to_string();
    let r = bad(&["--kernel", &kernel, "--initrd", path.to_str().expect("utf-8"), "--memory", "48"]);
    let _ = std::fs::remove_file(&path);
    assert_refused(&r, 2, "does not fit in guest memory above the kernel");
}

#[test]
fn config_file_with_unknown_field_is_refused() {
    let path = std::env::temp_dir().join(format!("moat-bad-config-{}.json", std::process::id()));
    std::fs::write(&path, r#"{"kernel": "/k", "vcpu": 2}"#).expect("write config");
    let r = bad(&["--config", path.to_str().expect("utf-8")]);
    let _ = std::fs::remove_file(&path);
    assert_refused(&r, 2, "is not a valid VmConfig: unknown field `vcpu`");
}

// --- vsock, hybrid: the agent's selftest talks to the host both ways ---

fn accept_with_timeout(l: &std::os::unix::net::UnixListener, timeout: Duration) -> std::os::unix::net::UnixStream {
    l.set_nonblocking(true).expect("nonblocking");
    let start = Instant::now();
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).expect("blocking");
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(start.elapsed() < timeout, "the guest never connected");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Connects to the VMM's vsock socket and asks for guest port `port`; returns the
/// stream and the handshake reply line (None if the VMM closed without one). The
/// line is read byte by byte so nothing of the stream after it is consumed.
fn vsock_connect(uds: &Path, port: u32) -> (std::os::unix::net::UnixStream, Option<String>) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(uds).expect("connect to the vsock socket");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    s.write_all(format!("CONNECT {port}\n").as_bytes()).expect("CONNECT");
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if s.read(&mut b).expect("handshake reply") == 0 {
            break;
        }
        line.push(b[0]);
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    (s, (!line.is_empty()).then_some(line))
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn vsock_both_directions() {
    use std::io::{BufRead, Write};
    require_kvm_that_boots_linux();
    let dir = std::env::temp_dir().join(format!("moat-vsock-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let uds = dir.join("vsock.sock");
    let hello_listener = std::os::unix::net::UnixListener::bind(dir.join("vsock.sock_7")).expect("bind _7");
    let mut args = boot_args(1, 128, "moat.selftest");
    args.extend(["--vsock".to_string(), uds.display().to_string()]);
    let mut child = spawn(&args);
    let pid = child.id() as libc::pid_t;

    // Console lines arrive on a channel so the test can wait for the echo service.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });

    // Guest to host: the agent connects to host port 7.
    let hello = accept_with_timeout(&hello_listener, BOOT_TIMEOUT);
    let mut line = String::new();
    std::io::BufReader::new(hello).read_line(&mut line).expect("hello line");
    assert_eq!(line, "hello from moat-agent\n");

    let start = Instant::now();
    loop {
        let l = rx.recv_timeout(BOOT_TIMEOUT).expect("console closed before the echo service was up");
        if l.contains("vsock echo listening") {
            break;
        }
        assert!(start.elapsed() < BOOT_TIMEOUT);
    }

    // Host to guest: CONNECT, OK, then an echo of a small and a large line (the large
    // one exercises credit flow control and payloads split across RX buffers).
    let (mut s, reply) = vsock_connect(&uds, 7);
    let reply = reply.expect("an OK line");
    assert!(reply.starts_with("OK ") && reply.ends_with('\n'), "{reply:?}");
    let big: String = "abcdefghij".repeat(30_000);
    let mut writer = s.try_clone().expect("clone");
    let big_line = format!("{big}\n");
    let w = std::thread::spawn(move || {
        writer.write_all(b"ping\n").expect("ping");
        writer.write_all(big_line.as_bytes()).expect("big line");
    });
    let mut reader = std::io::BufReader::new(s.try_clone().expect("clone"));
    let mut echoed = String::new();
    reader.read_line(&mut echoed).expect("echo");
    assert_eq!(echoed, "ping\n");
    echoed.clear();
    reader.read_line(&mut echoed).expect("big echo");
    assert_eq!(echoed.len(), big.len() + 1, "big line came back whole");
    assert!(echoed.trim_end() == big, "big line came back unchanged");
    w.join().expect("writer");
    s.flush().expect("flush");

    // A guest port nobody listens on: the guest resets it, the host sees EOF, no OK.
    let (_s2, reply) = vsock_connect(&uds, 4444);
    assert_eq!(reply, None, "no OK for a closed guest port");

    send_signal(pid, libc::SIGTERM);
    let status = wait_with_timeout(&mut child, Duration::from_secs(30)).expect("VMM stops on SIGTERM");
    assert_eq!(status.code(), Some(143));
    // A confined VMM may not unlink: its socket is for whoever made the directory
    // to remove (the shim and `moat run` remove their whole state dir).
    assert!(uds.exists(), "the VMM leaves its vsock socket behind");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vsock_socket_that_exists_is_refused() {
    assert!(Path::new("/dev/kvm").exists(), "/dev/kvm is missing");
    let path = std::env::temp_dir().join(format!("moat-vsock-exists-{}", std::process::id()));
    std::fs::write(&path, b"").expect("create");
    let kernel = artifact("vmlinux").display().to_string();
    let r = bad(&["--kernel", &kernel, "--vsock", path.to_str().expect("utf-8")]);
    let _ = std::fs::remove_file(&path);
    assert_refused(&r, 1, "already exists; remove it if no VM uses it");
}

// --- virtio-blk: a read-write and a read-only disk, seen and used by the guest ---

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn disks_read_write_and_read_only() {
    require_kvm_that_boots_linux();
    let dir = std::env::temp_dir().join(format!("moat-disk-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let image = |name: &str, tag: &[u8; 16]| {
        let mut data = vec![0u8; 1 << 20];
        data[..16].copy_from_slice(tag);
        let p = dir.join(name);
        std::fs::write(&p, &data).expect("disk image");
        p
    };
    let rw = image("rw.img", b"moat-disk-rw----");
    let ro = image("ro.img", b"moat-disk-ro----");
    let ro_before = std::fs::read(&ro).expect("read");
    let mut args = boot_args(1, 128, "moat.selftest moat.poweroff");
    args.extend(["--disk".into(), rw.display().to_string(), "--disk".into(), format!("{},ro", ro.display())]);
    let r = run_vmm(&args);
    assert!(r.status.success(), "{:?}\n{}\n{}", r.status, r.stdout, r.stderr);
    assert!(
        r.stdout.contains(r#"disk vda serial moat-disk0 sectors 2048 ro 0 starts "moat-disk-rw----" write ok"#),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains(r#"disk vdb serial moat-disk1 sectors 2048 ro 1 starts "moat-disk-ro----" write refused"#),
        "{}",
        r.stdout
    );
    let after = std::fs::read(&rw).expect("read rw");
    assert_eq!(&after[512..512 + 22], b"written by moat-agent\n", "the guest's write reached the file");
    assert_eq!(std::fs::read(&ro).expect("read ro"), ro_before, "the read-only disk is unchanged");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_disk_is_named() {
    let r = bad(&["--kernel", "/nonexistent", "--disk", "/nonexistent/disk.img"]);
    // The kernel is checked first; with a real kernel the disk is named.
    assert_refused(&r, 2, "is not usable");
    let kernel = artifact("vmlinux").display().to_string();
    let r = bad(&["--kernel", &kernel, "--disk", "/nonexistent/disk.img"]);
    assert_refused(&r, 2, "disk /nonexistent/disk.img is not usable");
}

// --- the agent's ttrpc API over hybrid vsock ---

/// A stream to guest port `port`, handshake done.
fn vsock_stream(uds: &Path, port: u32) -> std::os::unix::net::UnixStream {
    let (s, reply) = vsock_connect(uds, port);
    let reply = reply.unwrap_or_default();
    assert!(reply.starts_with("OK ") && reply.ends_with('\n'), "handshake reply {reply:?}");
    s.set_read_timeout(None).expect("no timeout");
    s
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn agent_api_version_over_vsock() {
    use moat_protocol::{AgentClient, VersionRequest, AGENT_API_PORT, PROTOCOL_VERSION};
    use std::io::BufRead;
    use std::os::fd::IntoRawFd;
    require_kvm_that_boots_linux();
    let dir = std::env::temp_dir().join(format!("moat-api-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let uds = dir.join("vsock.sock");
    let mut args = boot_args(1, 128, "");
    args.extend(["--vsock".to_string(), uds.display().to_string()]);
    let mut child = spawn(&args);
    let pid = child.id() as libc::pid_t;
    let out = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(out).lines();
    loop {
        let l = lines.next().expect("console closed before ready").expect("console");
        assert!(!l.contains("cannot serve the vsock API"), "{l}");
        if l.starts_with("moat-agent: ready") {
            break;
        }
    }
    let stream = vsock_stream(&uds, AGENT_API_PORT);
    let client = ttrpc::Client::new(stream.into_raw_fd()).expect("ttrpc client");
    let agent = AgentClient::new(client);
    let req = VersionRequest { host_protocol: PROTOCOL_VERSION, ..Default::default() };
    let v = agent.version(ttrpc::context::with_timeout(60_000_000_000), &req).expect("Version");
    assert_eq!(v.protocol, PROTOCOL_VERSION);
    assert!(v.kernel_release.starts_with("6.1."), "guest kernel: {:?}", v.kernel_release);
    assert!(!v.agent_version.is_empty());
    println!("agent {} on guest kernel {} (protocol {})", v.agent_version, v.kernel_release, v.protocol);
    send_signal(pid, libc::SIGTERM);
    let status = wait_with_timeout(&mut child, Duration::from_secs(30)).expect("VMM stops on SIGTERM");
    assert_eq!(status.code(), Some(143));
    let _ = std::fs::remove_dir_all(&dir);
}

// --- virtio-fs: virtiofsd shares a host directory, the guest reads and writes it ---

/// Starts the virtiofsd moat uses (the Rust one `make build` puts in build/bin) on
/// `share`, serving at `sock`; returns once it listens.
fn start_virtiofsd(share: &Path, sock: &Path) -> Child {
    let virtiofsd = artifact("virtiofsd");
    let _ = std::fs::remove_file(sock);
    let mut child = Command::new(&virtiofsd)
        .arg(format!("--socket-path={}", sock.display()))
        .arg(format!("--shared-dir={}", share.display()))
        .args(["--cache=auto", "--sandbox=namespace"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", virtiofsd.display()));
    let start = Instant::now();
    while !sock.exists() {
        let exited = child.try_wait().expect("wait for virtiofsd");
        if exited.is_some() || start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            let mut err = String::new();
            let _ = child.stderr.take().expect("virtiofsd stderr").read_to_string(&mut err);
            panic!("virtiofsd did not create {} ({exited:?}):\n{err}", sock.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn virtio_fs_both_directions() {
    require_kvm_that_boots_linux();
    let dir = std::env::temp_dir().join(format!("moat-fs-test-{}", std::process::id()));
    let share = dir.join("share");
    std::fs::create_dir_all(&share).expect("share dir");
    std::fs::write(share.join("from-host.txt"), "hello from the host\n").expect("host file");
    let sock = dir.join("fs.sock");
    let mut args = boot_args(1, 256, "moat.selftest moat.selftest.fs=moatfs moat.poweroff");
    args.extend(["--fs".into(), format!("moatfs={}", sock.display())]);
    // virtiofsd serves one connection, so each attempt (see run_vmm) gets its own.
    let mut run = None;
    for attempt in 1..=2 {
        let mut fsd = start_virtiofsd(&share, &sock);
        let mut child = spawn(&args);
        let status = wait_with_timeout(&mut child, BOOT_TIMEOUT);
        // The VMM is gone, so the vhost-user connection is closed: virtiofsd must exit.
        let fsd_status = wait_with_timeout(&mut fsd, Duration::from_secs(20));
        match status {
            Some(status) => {
                run = Some((collect(child, status), fsd_status, fsd));
                break;
            }
            None => eprintln!("*** moat-vmm {args:?} timed out (attempt {attempt}); retrying once ***"),
        }
    }
    let (r, fsd_status, mut fsd) = run.expect("moat-vmm timed out twice");
    let mut fsd_err = String::new();
    let _ = fsd.stderr.take().expect("virtiofsd stderr").read_to_string(&mut fsd_err);
    assert!(r.status.success(), "{:?}\n{}\n{}\nvirtiofsd:\n{fsd_err}", r.status, r.stdout, r.stderr);
    let report = |what: &str| format!("moat-agent: selftest: fs moatfs: {what}");
    assert!(r.stdout.contains(&report("mounted at /mnt/fs")), "{}", r.stdout);
    assert!(r.stdout.contains(&report(r#"from-host.txt reads "hello from the host\n""#)), "{}", r.stdout);
    assert!(r.stdout.contains(&report("from-guest.txt written")), "{}", r.stdout);
    assert!(r.stdout.contains(&report("unmounted")), "{}", r.stdout);
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest.txt")).expect("the guest's file is on the host"),
        "written by moat-agent over virtio-fs\n"
    );
    assert!(!share.join("bench.bin").exists(), "the guest removed its bench file");
    assert!(fsd_status.is_some(), "virtiofsd still running after the VM stopped\n{fsd_err}");
    if let Some(line) = r.stdout.lines().find(|l| l.contains("sequential write")) {
        println!("{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_fs_socket_is_named() {
    let kernel = artifact("vmlinux").display().to_string();
    let r = bad(&["--kernel", &kernel, "--fs", "moatfs=/nonexistent/fs.sock"]);
    assert_refused(&r, 2, "virtio-fs \"moatfs\": vhost-user backend at /nonexistent/fs.sock: vhost-user socket /nonexistent/fs.sock is not usable");
    // A socket nobody listens on any more.
    let dir = std::env::temp_dir().join(format!("moat-fs-dead-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let sock = dir.join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
    let r = bad(&["--kernel", &kernel, "--fs", &format!("moatfs={}", sock.display())]);
    let _ = std::fs::remove_dir_all(&dir);
    assert_refused(&r, 2, &format!("cannot connect to the vhost-user backend at {}", sock.display()));
}
