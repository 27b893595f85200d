//! `moat run` end to end: a real guest on real KVM, the real virtio-fs backend, the
//! agent building the container. Every assertion about the guest comes from a program
//! that ran inside the container.
//!
//! All tests here boot Linux, so they are `#[ignore]`d; `make test-kvm` runs them with
//! `--include-ignored` through integration/testhost. Timeouts are generous (the
//! emulated test host is slow) and only exist so that a hang fails instead of stalling;
//! no test asserts on how long anything took.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use moat_integration::{artifact, kvm_boots_linux, test_image, vsock_probe};
use sha2::{Digest, Sha256};

/// Longest a single `moat run` may take here before the test calls it a hang.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

struct Out {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

impl Out {
    fn code(&self) -> i32 {
        self.status.code().unwrap_or_else(|| panic!("moat died by a signal: {:?}; stderr: {}", self.status, self.stderr))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

fn require_kvm() {
    assert!(
        kvm_boots_linux(),
        "this test boots Linux and /dev/kvm here cannot (missing or PVM); run it through `make test-kvm`"
    );
}

fn moat_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(artifact("moat"));
    c.arg("run").args(args);
    c
}

fn img(name: &str) -> String {
    test_image(name).display().to_string()
}

/// Reads a pipe to its end on a thread.
fn reader<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

fn wait_or_kill(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait for moat") {
            return s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {timeout:?}; killed");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `moat run ARGS` with `stdin` fed (then closed), collecting everything it printed.
fn run_with(args: &[&str], stdin: Option<Vec<u8>>) -> Out {
    let mut child = moat_cmd(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moat");
    let feeder = stdin.map(|data| {
        let mut w = child.stdin.take().expect("stdin pipe");
        thread::spawn(move || {
            // The command may exit without reading everything; that is not our failure.
            let _ = w.write_all(&data);
        })
    });
    let out = reader(child.stdout.take().expect("stdout"));
    let err = reader(child.stderr.take().expect("stderr"));
    let status = wait_or_kill(&mut child, RUN_TIMEOUT, &format!("moat run {args:?}"));
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let stdout = out.join().expect("stdout reader");
    let stderr = String::from_utf8_lossy(&err.join().expect("stderr reader")).into_owned();
    eprintln!("moat run {args:?} -> {status:?}\n  stderr: {}", stderr.trim_end());
    Out { status, stdout, stderr }
}

fn run(args: &[&str]) -> Out {
    run_with(args, None)
}

/// `moat run ARGS` with the host config file `config` ($MOAT_CONFIG).
fn run_with_config(config: &Path, args: &[&str]) -> Out {
    let out = moat_cmd(args)
        .env("MOAT_CONFIG", config)
        .stdin(Stdio::null())
        .output()
        .expect("run moat");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("MOAT_CONFIG={} moat run {args:?} -> {:?}\n  stderr: {}", config.display(), out.status, stderr.trim_end());
    Out { status: out.status, stdout: out.stdout, stderr }
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn host_kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("host osrelease").trim().to_string()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("moat-run-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn s(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Processes whose command line mentions `needle` (our own test process excluded).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().filter(|s| s.bytes().all(|b| b.is_ascii_digit())) else { continue };
        if pid == std::process::id().to_string() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(format!("{pid}: {cmd}"));
            }
        }
    }
    found
}

fn mounts_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Nothing of the run named `name` is left: no process, no mount, no state dir.
fn assert_nothing_left(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let procs = processes_mentioning(name);
        let mounts = mounts_mentioning(name);
        let state = Path::new("/run/moat").join(name);
        if procs.is_empty() && mounts.is_empty() && !state.exists() {
            return;
        }
        if Instant::now() > deadline {
            panic!("run {name} left behind: processes {procs:?}, mounts {mounts:?}, state dir exists: {}", state.exists());
        }
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn runs_each_image_form_in_the_microvm() {
    require_kvm();
    let host = host_kernel();
    for image in ["busybox-oci", "busybox.tar", "busybox-rootfs"] {
        let o = run(&[&img(image), "--", "sh", "-c", "uname -r; cat /etc/moat-layer; test -e /old && echo old-still-there; exit 0"]);
        assert_eq!(o.code(), 0, "{image}: {}", o.stderr);
        let text = o.text();
        let mut lines = text.lines();
        let guest = lines.next().unwrap_or_default();
        assert!(!guest.is_empty() && guest != host, "{image}: uname -r {guest:?} is not the guest kernel (host {host:?})");
        assert_eq!(lines.next(), Some("2"), "{image}: the second layer is missing: {text:?}");
        assert!(!text.contains("old-still-there"), "{image}: the whiteout was not applied: {text:?}");
    }
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn image_config_supplies_command_env_and_workdir() {
    require_kvm();
    // No command: the image's Cmd (`sh`) reads its script from stdin.
    let o = run_with(&["-i", &img("busybox-oci")], Some(b"echo cmd=$0 env=$MOAT_IMAGE pwd=$(pwd)\n".to_vec()));
    assert_eq!(o.code(), 0, "{}", o.stderr);
    assert_eq!(o.text(), "cmd=sh env=busybox pwd=/\n");
    let o = run(&["-e", "FOO=bar baz", "-e", "MOAT_IMAGE=overridden", "-w", "/tmp", &img("busybox.tar"), "--", "sh", "-c", "echo \"$FOO|$MOAT_IMAGE|$(pwd)\""]);
    assert_eq!(o.code(), 0, "{}", o.stderr);
    assert_eq!(o.text(), "bar baz|overridden|/tmp\n");
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn users_and_groups() {
    require_kvm();
    let o = run(&["-u", "app", &img("busybox-oci"), "--", "id"]);
    assert_eq!(o.code(), 0, "{}", o.stderr);
    let id = o.text();
    assert!(id.starts_with("uid=1000(app) gid=1000(app)"), "{id:?}");
    assert!(id.contains("1001(extra)"), "supplementary group missing: {id:?}");
    let o = run(&["-u", "4321:8765", &img("busybox-oci"), "--", "sh", "-c", "echo $(id -u):$(id -g)"]);
    assert_eq!(o.code(), 0, "{}", o.stderr);
    assert_eq!(o.text(), "4321:8765\n");
    let o = run(&["-u", "nosuchuser", &img("busybox-oci"), "--", "id"]);
    assert_eq!(o.code(), 125, "unknown user: {}", o.stderr);
    assert!(o.stderr.contains("nosuchuser"), "the error must name the user: {}", o.stderr);
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn exit_codes() {
    require_kvm();
    let image = img("busybox-oci");
    for (cmd, want) in [
        ("exit 0", 0),
        ("exit 1", 1),
        ("exit 42", 42),
        // The container's init is PID 1 of its pid namespace, which no signal from
        // inside can kill; a child killed by a signal shows as 128+n in its parent.
        // (`; exit $?` keeps busybox sh from exec'ing the child in its own place.)
        ("sh -c 'kill -KILL $$'; exit $?", 137),
        ("sh -c 'kill -TERM $$'; exit $?", 143),
    ] {
        let o = run(&[&image, "--", "sh", "-c", cmd]);
        assert_eq!(o.code(), want, "{cmd}: {}", o.stderr);
    }
    let o = run(&[&image, "--", "/bin/notexec"]);
    assert_eq!(o.code(), 126, "not executable: {}", o.stderr);
    assert!(o.stderr.contains("notexec"), "{}", o.stderr);
    let o = run(&[&image, "--", "no-such-command", "x"]);
    assert_eq!(o.code(), 127, "missing: {}", o.stderr);
    assert!(o.stderr.contains("no-such-command"), "{}", o.stderr);
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn stdout_and_stderr_stay_apart() {
    require_kvm();
    let o = run(&[&img("busybox-oci"), "--", "sh", "-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2"]);
    assert_eq!(o.code(), 0, "{}", o.stderr);
    assert_eq!(o.text(), "out1\nout2\n");
    assert!(o.stderr.contains("err1\nerr2\n"), "{:?}", o.stderr);
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn hundred_mib_of_stdout_byte_exact() {
    require_kvm();
    // `seq` makes every line unique, so a lost, doubled or reordered byte anywhere in
    // the ~106 MB shows up; the host computes the same stream to compare against.
    const LAST: u32 = 13_000_000;
    let o = run(&[&img("busybox-oci"), "--", "seq", "1", &LAST.to_string()]);
    assert_eq!(o.code(), 0, "{}", o.stderr);
    let mut want = Vec::with_capacity(o.stdout.len());
    for n in 1..=LAST {
        want.extend_from_slice(n.to_string().as_bytes());
        want.push(b'\n');
    }
    assert!(want.len() >= 100 << 20, "the stream is at least 100 MiB");
    assert_eq!(o.stdout.len(), want.len(), "stdout length");
    if o.stdout != want {
        let at = o.stdout.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
        panic!("stdout differs from byte {at} on (sha256 {} vs {})", sha256(&o.stdout), sha256(&want));
    }
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn binary_stdin_round_trip() {
    require_kvm();
    // Every byte value, in a pattern that shows reordering, 4 MiB long.
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i ^ (i >> 8) ^ (i >> 16)) as u8).collect();
    let o = run_with(&["-i", &img("busybox-oci"), "--", "cat"], Some(data.clone()));
    assert_eq!(o.code(), 0, "{}", o.stderr);
    assert_eq!(o.stdout.len(), data.len());
    assert!(o.stdout == data, "stdin came back altered");
    // Without -i the command's stdin is empty.
    let o = run_with(&[&img("busybox-oci"), "--", "wc", "-c"], Some(b"ignored".to_vec()));
    assert_eq!(o.text().trim(), "0");
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn signals_reach_the_workload() {
    require_kvm();
    let mut child = moat_cmd(&[&img("busybox-oci"), "--", "sh", "-c",
        "trap 'echo got TERM; exit 5' TERM; trap 'echo got USR1' USR1; echo ready; while :; do sleep 0.1; done"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moat");
    let mut stdout = child.stdout.take().expect("stdout");
    let err = reader(child.stderr.take().expect("stderr"));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 256];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut seen = String::new();
    let wait_for = |what: &str, seen: &mut String| {
        let deadline = Instant::now() + RUN_TIMEOUT;
        while !seen.contains(what) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(chunk) => seen.push_str(&String::from_utf8_lossy(&chunk)),
                Err(_) => panic!("never saw {what:?}; got {seen:?}"),
            }
        }
    };
    wait_for("ready\n", &mut seen);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).expect("SIGUSR1");
    wait_for("got USR1\n", &mut seen);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = wait_or_kill(&mut child, RUN_TIMEOUT, "moat after SIGTERM");
    wait_for("got TERM\n", &mut seen);
    let stderr = String::from_utf8_lossy(&err.join().expect("stderr")).into_owned();
    assert_eq!(status.code(), Some(5), "stderr: {stderr}");
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn interrupt_and_kill_leave_nothing_behind() {
    require_kvm();
    // Ctrl-C on a workload that ignores it (PID 1 of its namespace has no handler):
    // moat forwards it, then ends the run itself.
    let name = format!("ctrlc-{}", std::process::id());
    let mut child = moat_cmd(&["--name", &name, &img("busybox-oci"), "--", "sleep", "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moat");
    let err = reader(child.stderr.take().expect("stderr"));
    wait_until_running(&name);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    thread::sleep(Duration::from_millis(500));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    let status = wait_or_kill(&mut child, RUN_TIMEOUT, "moat after two SIGINTs");
    let stderr = String::from_utf8_lossy(&err.join().expect("stderr")).into_owned();
    assert!(status.code().is_some_and(|c| c != 0), "Ctrl-C twice must end the run with a failure status: {status:?} {stderr}");
    assert_nothing_left(&name);

    // SIGKILL: moat cannot clean up itself; its VM and file-system backend must go
    // with it, and the rest must be gone once the next run starts.
    let name = format!("killed-{}", std::process::id());
    let mut child = moat_cmd(&["--name", &name, &img("busybox-oci"), "--", "sleep", "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moat");
    wait_until_running(&name);
    child.kill().expect("SIGKILL moat");
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !processes_mentioning(&name).is_empty() {
        assert!(Instant::now() < deadline, "processes outlived a SIGKILLed moat: {:?}", processes_mentioning(&name));
        thread::sleep(Duration::from_millis(200));
    }
    assert!(mounts_mentioning(&name).is_empty(), "mounts outlived a SIGKILLed moat: {:?}", mounts_mentioning(&name));
    let o = run(&[&img("busybox-oci"), "--", "true"]);
    assert_eq!(o.code(), 0, "{}", o.stderr);
    assert_nothing_left(&name);
}

/// Waits until the run `name` has a VMM process (the guest may still be booting).
fn wait_until_running(name: &str) {
    let deadline = Instant::now() + RUN_TIMEOUT;
    while !processes_mentioning(name).iter().any(|p| p.contains("moat-vmm")) {
        assert!(Instant::now() < deadline, "run {name} never started a VMM");
        thread::sleep(Duration::from_millis(100));
    }
    // Let the guest come up and the workload start.
    thread::sleep(Duration::from_secs(5));
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn a_vm_that_dies_mid_run_is_reported() {
    require_kvm();
    let name = format!("vmdies-{}", std::process::id());
    let mut child = moat_cmd(&["--name", &name, &img("busybox-oci"), "--", "sleep", "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moat");
    let err = reader(child.stderr.take().expect("stderr"));
    wait_until_running(&name);
    for p in processes_mentioning(&name).iter().filter(|p| p.contains("moat-vmm")) {
        let pid: i32 = p.split(':').next().and_then(|s| s.parse().ok()).expect("pid");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
    let status = wait_or_kill(&mut child, RUN_TIMEOUT, "moat after its VMM was killed");
    let stderr = String::from_utf8_lossy(&err.join().expect("stderr")).into_owned();
    assert_eq!(status.code(), Some(125), "stderr: {stderr}");
    assert!(stderr.contains("moat:"), "a clear message: {stderr}");
    assert_nothing_left(&name);
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn shared_directory_both_ways() {
    require_kvm();
    let dir = TempDir::new("share");
    std::fs::write(dir.path().join("from-host"), b"written on the host\n").expect("write");
    let vol = format!("{}:/data", dir.s());
    let o = run(&["-v", &vol, &img("busybox-oci"), "--", "sh", "-c",
        "cat /data/from-host && echo 'written in the guest' > /data/from-guest && head -c 8388608 /dev/urandom > /data/big && sha256sum /data/big"]);
    assert_eq!(o.code(), 0, "{}", o.stderr);
    let text = o.text();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("written on the host"));
    let back = std::fs::read_to_string(dir.path().join("from-guest")).expect("the guest's file on the host");
    assert_eq!(back, "written in the guest\n");
    // 8 MiB of random data: the host's copy hashes to what the guest computed.
    let big = std::fs::read(dir.path().join("big")).expect("the guest's big file on the host");
    assert_eq!(big.len(), 8 << 20);
    let guest_sum = lines.next().and_then(|l| l.split_whitespace().next()).unwrap_or_default();
    assert_eq!(sha256(&big), guest_sum, "the file differs between guest and host");
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn read_only_rootfs_and_bind_mounts_are_enforced() {
    require_kvm();
    let o = run(&["--read-only", &img("busybox-oci"), "--", "sh", "-c", "touch /newfile && echo WROTE; touch /tmp/x 2>/dev/null; exit 0"]);
    assert_eq!(o.code(), 0, "{}", o.stderr);
    assert!(!o.text().contains("WROTE"), "wrote to a read-only rootfs");
    assert!(o.stderr.contains("Read-only file system"), "{}", o.stderr);

    let dir = TempDir::new("ro");
    std::fs::write(dir.path().join("keep"), b"original\n").expect("write");
    let vol = format!("{}:/data:ro", dir.s());
    let o = run(&["-v", &vol, &img("busybox-oci"), "--", "sh", "-c",
        "cat /data/keep; echo changed > /data/keep && echo WROTE1; touch /data/new && echo WROTE2; mount -o remount,rw /data && echo REMOUNTED; exit 0"]);
    assert_eq!(o.code(), 0, "{}", o.stderr);
    assert_eq!(o.text().lines().next(), Some("original"));
    assert!(!o.text().contains("WROTE"), "wrote through a read-only bind: {}", o.text());
    assert_eq!(std::fs::read_to_string(dir.path().join("keep")).expect("read"), "original\n");
    assert!(!dir.path().join("new").exists());
}

/// KiB used on the file system holding `path` (statvfs).
fn used_kib(path: &str) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).expect("statvfs");
    (s.blocks() - s.blocks_free()) * s.fragment_size() / 1024
}

/// A container that fills its writable layer hits its own quota (ENOSPC from the
/// guest's disk image), not the host's RAM: the host's /run does not grow while the
/// layer is full, another run works meanwhile, and the image goes with the run.
#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn writable_layer_has_a_disk_quota() {
    require_kvm();
    let run_before = used_kib("/run");
    // The container holds its full layer until the host says go (a file in /ctl).
    let ctl = TempDir::new("quota-ctl");
    let script = "dd if=/dev/zero of=/fill bs=1M count=256 2>&1; echo dd-exit=$?; echo filled; \
                  while [ ! -e /ctl/go ]; do sleep 1; done; echo released";
    let vol = format!("{}:/ctl", ctl.s());
    let mut child = moat_cmd(&["--name", "dq64", "--disk-size", "64", "-v", &vol, &img("busybox-oci"), "--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moat");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let err = reader(child.stderr.take().expect("stderr"));
    let mut text = String::new();
    let deadline = Instant::now() + RUN_TIMEOUT;
    while !text.contains("filled") && Instant::now() < deadline {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut out, &mut line).expect("read") == 0 {
            break;
        }
        text.push_str(&line);
    }
    let run_full = used_kib("/run");
    let disk = Path::new("/var/lib/moat/scratch/dq64.img");
    let disk_kib = std::fs::metadata(disk).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) / 2).unwrap_or(0);
    // Another run works while this one's layer is full.
    let other = run(&[&img("busybox-oci"), "--", "sh", "-c", "dd if=/dev/zero of=/f bs=1M count=16 2>/dev/null && echo other-ok"]);
    std::fs::write(ctl.path().join("go"), b"").expect("release the container");
    let status = wait_or_kill(&mut child, RUN_TIMEOUT, "moat run with a full layer");
    let mut rest = String::new();
    let _ = out.read_to_string(&mut rest);
    text.push_str(&rest);
    let stderr = String::from_utf8_lossy(&err.join().expect("stderr")).into_owned();
    eprintln!("guest: {text}\n/run used: {run_before} KiB before, {run_full} KiB with the layer full; disk image {disk_kib} KiB allocated\n{stderr}");
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(text.contains("released"), "{text}");
    assert!(text.contains("No space left on device"), "the container never hit its quota: {text}");
    assert!(text.contains("dd-exit=1"), "{text}");
    let copied: u64 = text.lines().find_map(|l| l.strip_suffix("+0 records out").and_then(|n| n.trim().parse().ok())).unwrap_or(u64::MAX);
    assert!(copied < 64, "wrote {copied} MiB into a 64 MiB layer: {text}");
    assert!(run_full < run_before + 8 * 1024, "the host's /run grew from {run_before} to {run_full} KiB");
    assert!(disk_kib > 16 * 1024 && disk_kib <= 64 * 1024 + 1024, "the layer's image holds {disk_kib} KiB");
    assert_eq!(other.code(), 0, "{}", other.stderr);
    assert_eq!(other.text().trim(), "other-ok");
    assert_nothing_left("dq64");
    assert!(!disk.exists(), "the layer's disk image outlived its run");
    let too_big = run(&["--disk-size", "99999999", &img("busybox-oci"), "--", "true"]);
    assert_eq!(too_big.code(), 125);
    assert!(too_big.stderr.contains("max_disk_mib"), "{}", too_big.stderr);
}

/// virtiofsd acts as root for the guest, yet a guest's root cannot leave a set-ID
/// program or a device node in a writable volume (nor in a root directory used in
/// place).
#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn volumes_refuse_set_id_files_and_devices() {
    require_kvm();
    let dir = TempDir::new("setid");
    std::fs::write(dir.path().join("prog"), b"#!/bin/sh\n").expect("write");
    std::fs::set_permissions(dir.path().join("prog"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let vol = format!("{}:/v", dir.s());
    let o = run(&["-v", &vol, &img("busybox-oci"), "--", "sh", "-c",
        "chmod u+s /v/prog 2>&1 && echo SUID; chmod g+s /v/prog 2>&1 && echo SGID; \
         cp /bin/busybox /v/bb && chmod 4755 /v/bb 2>&1 && echo SUID-COPY; \
         mknod /v/sda b 8 0 2>&1 && echo BLOCK-DEV; mknod /v/mem c 1 1 2>&1 && echo CHAR-DEV; \
         mkfifo /v/fifo && echo fifo-ok; echo 'plain write' > /v/plain && echo done"]);
    assert_eq!(o.code(), 0, "{}", o.stderr);
    let text = o.text();
    for bad in ["SUID", "SGID", "BLOCK-DEV", "CHAR-DEV"] {
        assert!(!text.contains(bad), "{bad} in a writable volume: {text}");
    }
    assert!(text.contains("fifo-ok") && text.contains("done"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = |n: &str| std::fs::metadata(dir.path().join(n)).map(|m| m.permissions().mode() & 0o7777);
    assert_eq!(mode("prog").expect("prog"), 0o755);
    assert!(mode("bb").expect("copied busybox") & 0o6000 == 0, "a set-ID copy landed on the host");
    assert!(!dir.path().join("sda").exists() && !dir.path().join("mem").exists());
    assert_eq!(std::fs::read_to_string(dir.path().join("plain")).expect("plain"), "plain write\n");
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn fork_bomb_is_bounded_by_the_pids_limit() {
    require_kvm();
    // Only shell builtins after the bomb starts (nothing else could fork). busybox sh
    // gives up when a fork fails, so the bomb burns out at the limit; pids.events
    // counts the forks the limit refused, which proves it was reached and held.
    let script = "sleep 20 & s=$!; f() { f | f & }; (f) >/dev/null 2>&1 & wait $s; \
                  read max < /sys/fs/cgroup/pids.max; while read k v; do [ $k = max ] && echo \"max=$max refused=$v\"; done < /sys/fs/cgroup/pids.events";
    let mut child = moat_cmd(&["--pids-limit", "64", &img("busybox-oci"), "--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moat");
    let out = reader(child.stdout.take().expect("stdout"));
    let err = reader(child.stderr.take().expect("stderr"));
    // While the bomb runs, the host must still start processes; print how long it took.
    thread::sleep(Duration::from_secs(10));
    let t = Instant::now();
    let st = Command::new("true").status().expect("host still spawns processes");
    assert!(st.success());
    eprintln!("host spawned `true` in {:?} during the guest fork bomb", t.elapsed());
    let status = wait_or_kill(&mut child, RUN_TIMEOUT, "moat with a fork bomb");
    let text = String::from_utf8_lossy(&out.join().expect("stdout")).into_owned();
    let stderr = String::from_utf8_lossy(&err.join().expect("stderr")).into_owned();
    assert_eq!(status.code(), Some(0), "{text} {stderr}");
    let fields: Vec<&str> = text.trim().split(' ').collect();
    assert_eq!(fields.first(), Some(&"max=64"), "{text:?}");
    let refused: u64 = fields.get(1).and_then(|f| f.strip_prefix("refused=")).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{text:?}"));
    assert!(refused > 0, "the bomb never hit the pids limit: {text:?}");
}

fn openpty(rows: u16, cols: u16) -> (OwnedFd, OwnedFd) {
    let ws = nix::pty::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    let p = nix::pty::openpty(Some(&ws), None).expect("openpty");
    (p.master, p.slave)
}

#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn tty_with_resize() {
    require_kvm();
    let (master, slave) = openpty(33, 101);
    let slave_path = nix::unistd::ttyname(&slave).expect("ttyname");
    let mut child = moat_cmd(&["-t", "-i", &img("busybox-oci"), "--", "sh", "-c",
        "test -t 0 && test -t 1 && tty && echo is-a-tty; stty size; while read x; do [ \"$x\" = q ] && exit 7; stty size; done"])
        .stdin(Stdio::from(slave.try_clone().expect("dup")))
        .stdout(Stdio::from(slave.try_clone().expect("dup")))
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("start moat");
    let mut m_read = std::fs::File::from(master.try_clone().expect("dup master"));
    let mut m_write = std::fs::File::from(master);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = m_read.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let wait_for = |what: &str, seen: &mut String, poke: &mut dyn FnMut()| {
        let deadline = Instant::now() + RUN_TIMEOUT;
        while !seen.contains(what) {
            assert!(Instant::now() < deadline, "never saw {what:?} on the tty; got {seen:?}");
            poke();
            if let Ok(chunk) = rx.recv_timeout(Duration::from_secs(1)) {
                seen.push_str(&String::from_utf8_lossy(&chunk));
            }
        }
    };
    wait_for("is-a-tty", &mut seen, &mut || {});
    wait_for("33 101", &mut seen, &mut || {});
    // Resize the host terminal the way a terminal emulator does, then SIGWINCH.
    let st = Command::new("stty").args(["-F", &slave_path.display().to_string(), "rows", "50", "cols", "120"]).status().expect("stty");
    assert!(st.success());
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGWINCH).expect("SIGWINCH");
    // Each newline makes the guest print its size again, until it shows the new one.
    wait_for("50 120", &mut seen, &mut || {
        let _ = m_write.write_all(b"\n");
    });
    m_write.write_all(b"q\n").expect("write q");
    let status = wait_or_kill(&mut child, RUN_TIMEOUT, "moat -t");
    assert_eq!(status.code(), Some(7), "tty output: {seen:?}");
}

/// No container reaches the agent over vsock, as root or as a user. With moat's
/// default seccomp profile (what `moat run` gives) socket(AF_VSOCK) itself fails;
/// with the profile turned off in the host config (`default_seccomp = false`, a spec
/// without seccomp) the socket is made but connecting to CID 1 (local), 2 (the host,
/// where nothing listens on these ports) or 3 (the guest itself) on the agent's API
/// and stdio ports fails.
#[test]
#[ignore = "boots Linux: run through `make test-kvm`"]
fn containers_cannot_reach_the_agent_over_vsock() {
    require_kvm();
    let dir = TempDir::new("vsock");
    std::fs::copy(vsock_probe(), dir.path().join("vsock-probe")).expect("copy moat-vsock-probe");
    let on = dir.path().join("seccomp-on.toml");
    let off = dir.path().join("seccomp-off.toml");
    std::fs::write(&on, "default_seccomp = true\n").expect("config");
    std::fs::write(&off, "default_seccomp = false\n").expect("config");
    let vol = format!("{}:/probe:ro", dir.s());
    let targets: Vec<String> = ["1", "2", "3"].iter().flat_map(|cid| ["1024", "1025"].map(|port| format!("{cid}:{port}"))).collect();
    let image = img("busybox-oci");
    for (config, stage) in [(&on, "socket-failed"), (&off, "connect-failed")] {
        for user in ["0:0", "1000:1000"] {
            let mut args = vec!["-u", user, "-v", &vol, &image, "--", "/probe/vsock-probe"];
            args.extend(targets.iter().map(String::as_str));
            let o = run_with_config(config, &args);
            assert_eq!(o.code(), 0, "{}", o.stderr);
            let text = o.text();
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len(), targets.len(), "{text}");
            for (line, target) in lines.iter().zip(&targets) {
                assert!(line.starts_with(&format!("{target} {stage} ")), "{} as {user}: {line}", config.display());
            }
            if stage == "socket-failed" {
                assert!(lines.iter().all(|l| l.ends_with("EAFNOSUPPORT")), "{text}");
            }
            println!("ok: {} as {user}: {}", config.display(), lines.join(", "));
        }
    }
}
