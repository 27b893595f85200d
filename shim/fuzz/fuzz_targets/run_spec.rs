//! `moat run`'s OCI spec builder on external input: the image's config (from the
//! image author), the image's own /etc/passwd and /etc/group (resolving `-u`), and the
//! user's flags (`-v`, `-e`, `-w`, `-u`, the command).
//!
//! Input: `flags u8` (bit 0: the image's passwd and group are symlinks to the host's
//! /etc/passwd and /etc/group; bit 1 `-t`; bit 2 `--read-only`; bit 3
//! no_new_privileges; bit 4 `--pids-limit` given; bit 5 the default seccomp profile), `pids_limit u32` (as i32), then
//! sections of `len u16` bytes: the image config's `config` object (JSON), passwd,
//! group, `-u` (empty: none), `-w` (empty: none), `-e` values, the command's
//! arguments and `-v` values (one per line each), the hostname.
//!
//! Checked: no panic; a built spec has a command, an absolute cwd, each environment
//! key once (PATH among them), absolute mount destinations, a positive pids limit, the
//! default seccomp profile exactly when asked for; and
//! a user name never resolves through the host's own /etc/passwd.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use moat_shim::image::ImageConfig;
use moat_shim::run::parse_volume;
use moat_shim::spec::{build, BindMount, SpecOptions};
use moat_shim_fuzz::{Reader, Scratch};
use serde_json::Value;

fn lines(s: &str) -> Vec<String> {
    s.lines().map(str::to_string).collect()
}

fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let pids_limit = r.u32() as i32;
    let Ok(image) = serde_json::from_slice::<ImageConfig>(r.section()) else { return };
    let (passwd, group) = (r.section(), r.section());
    let scratch = Scratch::new();
    let root = scratch.root();
    std::fs::create_dir(root.join("etc")).expect("etc");
    let host_links = flags & 1 != 0;
    if host_links {
        std::os::unix::fs::symlink("/etc/passwd", root.join("etc/passwd")).expect("passwd link");
        std::os::unix::fs::symlink("/etc/group", root.join("etc/group")).expect("group link");
    } else {
        std::fs::write(root.join("etc/passwd"), passwd).expect("passwd");
        std::fs::write(root.join("etc/group"), group).expect("group");
    }
    let user = Some(r.text()).filter(|u| !u.is_empty());
    let workdir = Some(r.text()).filter(|w| !w.is_empty());
    let env = lines(&r.text());
    let args = lines(&r.text());
    let mut mounts = Vec::new();
    for (i, v) in lines(&r.text()).iter().enumerate() {
        let Ok((_host, destination, read_only)) = parse_volume(v) else { return };
        mounts.push(BindMount { source: format!("/run/moat/volumes/{i}"), destination, read_only });
    }
    let opts = SpecOptions {
        args,
        env,
        workdir,
        user: user.clone(),
        terminal: flags & 2 != 0,
        read_only: flags & 4 != 0,
        mounts,
        pids_limit: (flags & 16 != 0).then_some(i64::from(pids_limit)),
        hostname: r.text(),
        no_new_privileges: flags & 8 != 0,
        default_seccomp: flags & 32 != 0,
    };
    let Ok(spec) = build(&image, &root, "/run/moat/shared/rootfs", &opts) else { return };
    assert_eq!(
        spec["linux"]["seccomp"].is_object(),
        opts.default_seccomp,
        "the default seccomp profile is there exactly when asked for"
    );
    let p = &spec["process"];
    assert!(p["args"].as_array().is_some_and(|a| !a.is_empty()), "no command");
    assert!(p["cwd"].as_str().is_some_and(|c| c.starts_with('/')), "relative cwd");
    let mut keys = HashSet::new();
    for e in p["env"].as_array().expect("env") {
        let (k, _) = e.as_str().and_then(|e| e.split_once('=')).expect("env entry without =");
        assert!(keys.insert(k.to_string()), "env key {k:?} twice");
    }
    assert!(keys.contains("PATH"), "no PATH");
    for m in spec["mounts"].as_array().expect("mounts") {
        assert!(m["destination"].as_str().is_some_and(|d| d.starts_with('/')), "relative mount destination {m}");
    }
    if let Some(n) = spec["linux"]["resources"]["pids"]["limit"].as_i64() {
        assert!(n > 0, "pids limit {n}");
    }
    if host_links {
        // The image's databases are symlinks to the host's, which resolve inside the
        // image (to themselves): any user found must be a number with no entry.
        let u = user.or(image.user.clone()).unwrap_or_default();
        let name = u.split(':').next().unwrap_or_default();
        let numeric = name.is_empty() || name.bytes().all(|b| b.is_ascii_digit());
        assert!(numeric, "user {u:?} resolved with symlinks to the host's /etc/passwd");
        assert_eq!(p["user"]["additionalGids"], Value::Array(Vec::new()), "groups from the host's /etc/group");
    }
    scratch.check_untouched(&[]);
}

fuzz_target!(|data: &[u8]| run(data));
