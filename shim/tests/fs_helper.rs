//! The fs backend helper (`moat __moat-helper fs JSON`) for real: its mounts exist in
//! its own mount namespace only, a read-only bind refuses writes, and it exec's the
//! backend there. A shell script stands in for virtiofsd. Needs root (mounts).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use moat_shim::helper::{FsBackend, HostMount, HELPER_ARG};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn mounts_live_only_in_the_backend_namespace() {
    if !is_root() {
        eprintln!("*** SKIPPED: mounting needs root ***");
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    for sub in ["lower", "upper", "work", "shared/rootfs", "shared/vol/0", "vol"] {
        std::fs::create_dir_all(d.join(sub)).expect("mkdir");
    }
    std::fs::write(d.join("lower/from-image"), b"image\n").expect("lower file");
    std::fs::write(d.join("vol/keep"), b"host\n").expect("vol file");
    // A mount inside the read-only volume must come along read-only too.
    std::fs::create_dir(d.join("vol/sub")).expect("submount dir");
    nix::mount::mount(Some("tmpfs"), &d.join("vol/sub"), Some("tmpfs"), nix::mount::MsFlags::empty(), None::<&str>).expect("tmpfs submount");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _sub = Unmount(d.join("vol/sub"));
    // The stand-in backend reports what it sees, then signals readiness.
    let script = d.join("fake-virtiofsd");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nd={}\ncat $d/shared/rootfs/from-image > $d/seen 2>&1\n\
             echo new > $d/shared/rootfs/written-in-ns\n\
             if echo x > $d/shared/vol/0/keep 2>/dev/null; then echo vol-writable >> $d/seen; else echo vol-ro >> $d/seen; fi\n\
             if echo x > $d/shared/vol/0/sub/f 2>/dev/null; then echo sub-writable >> $d/seen; else echo sub-ro >> $d/seen; fi\n\
             if ln -s /etc $d/shared/planted 2>/dev/null; then echo skel-writable >> $d/seen; else echo skel-ro >> $d/seen; fi\n\
             touch $d/fs.sock\nexec sleep 60\n",
            d.display()
        ),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let cfg = FsBackend {
        parent_pid: std::process::id() as i32,
        virtiofsd: script,
        socket: d.join("fs.sock"),
        shared: d.join("shared"),
        shared_is_mount: false,
        hardened: false,
        cgroup: None,
        mounts: vec![
            HostMount::Overlay { lower: d.join("lower"), upper: d.join("upper"), work: d.join("work"), target: d.join("shared/rootfs") },
            HostMount::Bind { source: d.join("vol"), target: d.join("shared/vol/0"), read_only: true },
        ],
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg(HELPER_ARG)
        .arg("fs")
        .arg(serde_json::to_string(&cfg).expect("json"))
        .spawn()
        .expect("start helper");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.join("fs.sock").exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("helper exited early: {st}; saw: {:?}", std::fs::read_to_string(d.join("seen")));
        }
        assert!(Instant::now() < deadline, "the stand-in backend never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = std::fs::read_to_string(d.join("seen")).expect("seen");
    assert_eq!(seen, "image\nvol-ro\nsub-ro\nskel-ro\n", "what the backend saw");
    assert!(!d.join("shared/planted").exists(), "the share's own directories are read-only to the backend");
    // On the host side nothing is mounted: the write went to the overlay's upper dir.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let leaked: Vec<&str> = mountinfo.lines().filter(|l| l.contains(&d.display().to_string()) && !l.contains("/vol/sub ")).collect();
    assert!(leaked.is_empty(), "a helper mount leaked into the host namespace: {leaked:?}");
    assert!(!d.join("shared/rootfs/from-image").exists());
    assert_eq!(std::fs::read(d.join("upper/written-in-ns")).expect("upper"), b"new\n");
    assert_eq!(std::fs::read(d.join("vol/keep")).expect("vol"), b"host\n");
    child.kill().expect("kill");
    child.wait().expect("wait");
}

#[test]
fn exec_helper_runs_the_program_and_refuses_orphans() {
    let out = Command::new(env!("CARGO_BIN_EXE_moat"))
        .args([HELPER_ARG, "exec", &std::process::id().to_string(), "/bin/echo", "hello"])
        .output()
        .expect("run helper");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"hello\n");
    // A parent pid that is not ours: the helper must refuse (it would not die with us).
    let out = Command::new(env!("CARGO_BIN_EXE_moat")).args([HELPER_ARG, "exec", "1", "/bin/echo", "x"]).output().expect("run");
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("parent exited"), "{out:?}");
    assert!(Path::new("/bin/echo").exists());
}

/// The backend of shared host directories cannot leave set-ID programs or device
/// nodes in them, whatever the guest asks for (virtiofsd acts as root).
#[test]
fn hardened_backend_refuses_set_id_modes_and_devices() {
    if !is_root() {
        eprintln!("*** SKIPPED: mounting needs root ***");
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path();
    for sub in ["shared/0", "vol"] {
        std::fs::create_dir_all(d.join(sub)).expect("mkdir");
    }
    std::fs::write(d.join("vol/prog"), b"#!/bin/sh\n").expect("vol file");
    let script = d.join("fake-virtiofsd");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nd={}\nv=$d/shared/0\n\
             chmod 4755 $v/prog 2>/dev/null && echo suid-set >> $d/seen || echo suid-refused >> $d/seen\n\
             chmod 2755 $v/prog 2>/dev/null && echo sgid-set >> $d/seen || echo sgid-refused >> $d/seen\n\
             chmod 0755 $v/prog && echo plain-ok >> $d/seen\n\
             mknod $v/disk b 8 0 2>/dev/null && echo blk-made >> $d/seen || echo blk-refused >> $d/seen\n\
             mknod $v/fifo p && echo fifo-ok >> $d/seen\n\
             touch $d/fs.sock\nexec sleep 60\n",
            d.display()
        ),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let cfg = FsBackend {
        parent_pid: std::process::id() as i32,
        virtiofsd: script,
        socket: d.join("fs.sock"),
        shared: d.join("shared"),
        shared_is_mount: false,
        hardened: true,
        cgroup: None,
        mounts: vec![HostMount::Bind { source: d.join("vol"), target: d.join("shared/0"), read_only: false }],
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_moat"))
        .arg(HELPER_ARG)
        .arg("fs")
        .arg(serde_json::to_string(&cfg).expect("json"))
        .spawn()
        .expect("start helper");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.join("fs.sock").exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("helper exited early: {st}; saw: {:?}", std::fs::read_to_string(d.join("seen")));
        }
        assert!(Instant::now() < deadline, "the stand-in backend never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("kill");
    child.wait().expect("wait");
    let seen = std::fs::read_to_string(d.join("seen")).expect("seen");
    assert_eq!(seen, "suid-refused\nsgid-refused\nplain-ok\nblk-refused\nfifo-ok\n", "what the backend could do");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(d.join("vol/prog")).expect("prog").permissions().mode() & 0o7777, 0o755);
    assert!(!d.join("vol/disk").exists());
}
