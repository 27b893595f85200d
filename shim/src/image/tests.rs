use super::unpack::tests::{tar_of, E};
use super::*;
use std::fs::File;
use std::io::Write;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip finish")
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

fn config_json(layers: &[&[u8]]) -> Vec<u8> {
    let ids: Vec<String> = layers.iter().map(|l| sha(l)).collect();
    serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "true"], "Env": ["PATH=/bin", "A=1"], "WorkingDir": "/w", "User": "1000:1000"},
        "rootfs": {"type": "layers", "diff_ids": ids}
    })
    .to_string()
    .into_bytes()
}

fn layer1() -> Vec<u8> {
    tar_of(&[E::Dir("bin/"), E::File("bin/sh", b"#!"), E::File("etc/a", b"a"), E::File("etc/b", b"b")])
}

fn layer2() -> Vec<u8> {
    tar_of(&[E::File("etc/.wh.a", b""), E::File("etc/c", b"c")])
}

/// Files of a docker-save archive (legacy layout: <id>/layer.tar, <hex>.json).
fn docker_save_files() -> Vec<(String, Vec<u8>)> {
    let (l1, l2) = (layer1(), layer2());
    let cfg = config_json(&[&l1, &l2]);
    let cfg_name = format!("{}.json", sha256_hex(&cfg));
    let manifest = serde_json::json!([{"Config": cfg_name, "RepoTags": ["t:latest"], "Layers": ["one/layer.tar", "two/layer.tar"]}]);
    vec![
        ("manifest.json".into(), manifest.to_string().into_bytes()),
        (cfg_name, cfg),
        ("one/layer.tar".into(), l1),
        ("two/layer.tar".into(), l2),
    ]
}

/// Files of an OCI layout: index -> nested index -> manifest (gzip layer 1, plain 2).
fn oci_files(layer2_media: &str) -> Vec<(String, Vec<u8>)> {
    let (l1, l2) = (layer1(), layer2());
    let l1gz = gzip(&l1);
    let cfg = config_json(&[&l1, &l2]);
    let blob = |d: &[u8]| (format!("blobs/sha256/{}", sha256_hex(d)), d.to_vec());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&cfg), "size": cfg.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(&l1gz), "size": l1gz.len()},
            {"mediaType": layer2_media, "digest": sha(&l2), "size": l2.len()}
        ]
    })
    .to_string()
    .into_bytes();
    let arm = b"{}".to_vec();
    let nested = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&arm), "size": arm.len(), "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&manifest), "size": manifest.len(), "platform": {"architecture": "amd64", "os": "linux"}}
        ]
    })
    .to_string()
    .into_bytes();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha(&nested), "size": nested.len()}]
    });
    vec![
        ("oci-layout".into(), br#"{"imageLayoutVersion": "1.0.0"}"#.to_vec()),
        ("index.json".into(), index.to_string().into_bytes()),
        blob(&nested),
        blob(&manifest),
        blob(&arm),
        blob(&cfg),
        blob(&l1gz),
        blob(&l2),
    ]
}

fn write_dir(dir: &Path, files: &[(String, Vec<u8>)]) {
    for (name, data) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, data).expect("write");
    }
}

fn write_tar(path: &Path, files: &[(String, Vec<u8>)]) {
    let mut b = tar::Builder::new(File::create(path).expect("create tar"));
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, &data[..]).expect("append");
    }
    b.finish().expect("finish");
}

fn check_image(img: &Image) {
    let r = &img.rootfs;
    assert_eq!(std::fs::read(r.join("bin/sh")).expect("bin/sh"), b"#!");
    assert!(!r.join("etc/a").exists(), "whiteout applied");
    assert!(r.join("etc/b").exists() && r.join("etc/c").exists());
    assert_eq!(img.config.entrypoint.as_deref(), Some(&["/bin/sh".to_string()][..]));
    assert_eq!(img.config.working_dir.as_deref(), Some("/w"));
    assert_eq!(img.config.user.as_deref(), Some("1000:1000"));
    assert!(img.digest.as_deref().is_some_and(|d| d.starts_with("sha256:")));
}

#[test]
fn docker_save_tarball() {
    let tmp = tempfile::tempdir().expect("tmp");
    let tarball = tmp.path().join("img.tar");
    write_tar(&tarball, &docker_save_files());
    let img = prepare(&tarball, &tmp.path().join("cache")).expect("prepare");
    check_image(&img);
    // Reused from the cache the second time (a marker survives).
    std::fs::write(img.rootfs.join("marker"), b"").expect("marker");
    let again = prepare(&tarball, &tmp.path().join("cache")).expect("prepare again");
    assert!(again.rootfs.join("marker").exists());
}

#[test]
fn oci_layout_dir_and_tar_with_nested_index() {
    let tmp = tempfile::tempdir().expect("tmp");
    let files = oci_files("application/vnd.oci.image.layer.v1.tar");
    let dir = tmp.path().join("layout");
    write_dir(&dir, &files);
    check_image(&prepare(&dir, &tmp.path().join("cache1")).expect("layout dir"));
    let tarball = tmp.path().join("layout.tar");
    write_tar(&tarball, &files);
    check_image(&prepare(&tarball, &tmp.path().join("cache2")).expect("layout tar"));
}

#[test]
fn zstd_and_unknown_layers_are_refused_clearly() {
    let tmp = tempfile::tempdir().expect("tmp");
    for media in ["application/vnd.oci.image.layer.v1.tar+zstd", "application/x-frob"] {
        let dir = tmp.path().join(media.replace('/', "_"));
        write_dir(&dir, &oci_files(media));
        let e = prepare(&dir, &tmp.path().join("cache")).expect_err("unsupported");
        assert!(matches!(e, ImageError::UnsupportedLayer { .. }), "{e}");
        assert!(e.to_string().contains(media), "{e}");
    }
}

#[test]
fn tampered_blobs_are_refused_and_not_cached() {
    let tmp = tempfile::tempdir().expect("tmp");
    // A layer whose bytes do not match its digest (same size).
    let mut files = oci_files("application/vnd.oci.image.layer.v1.tar");
    let l2 = layer2();
    let name = format!("blobs/sha256/{}", sha256_hex(&l2));
    let f = files.iter_mut().find(|(n, _)| *n == name).expect("layer 2 blob");
    let last = f.1.len() - 1;
    f.1[last] ^= 1;
    let dir = tmp.path().join("bad");
    write_dir(&dir, &files);
    let cache = tmp.path().join("cache");
    let e = prepare(&dir, &cache).expect_err("tampered");
    assert!(matches!(e, ImageError::Digest { .. }), "{e}");
    let left: Vec<_> = std::fs::read_dir(&cache).expect("cache").map(|e| e.expect("e").file_name()).collect();
    assert!(left.iter().all(|n| n.to_string_lossy().ends_with(".lock")), "half an image was left: {left:?}");
    // docker-save: a layer that does not match the config's diff_id.
    let mut files = docker_save_files();
    files[3].1 = tar_of(&[E::File("etc/evil", b"x")]);
    let tarball = tmp.path().join("bad.tar");
    write_tar(&tarball, &files);
    assert!(matches!(prepare(&tarball, &cache), Err(ImageError::Digest { .. })));
}

#[test]
fn hostile_manifests_and_missing_images() {
    let tmp = tempfile::tempdir().expect("tmp");
    let e = prepare(&tmp.path().join("nope.tar"), tmp.path()).expect_err("missing");
    assert!(matches!(e, ImageError::Missing(_)), "{e}");
    let manifest = serde_json::json!([{"Config": "../../etc/passwd", "Layers": []}]);
    let dir = tmp.path().join("evil");
    write_dir(&dir, &[("manifest.json".into(), manifest.to_string().into_bytes())]);
    let e = prepare(&dir, &tmp.path().join("cache")).expect_err("escape");
    assert!(e.to_string().contains("outside"), "{e}");
    let junk = tmp.path().join("junk.tar");
    write_tar(&junk, &[("hello".into(), b"x".to_vec())]);
    assert!(prepare(&junk, &tmp.path().join("cache")).expect_err("not an image").to_string().contains("neither"));
}

#[test]
fn plain_directory_is_used_as_is() {
    let tmp = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(tmp.path().join("bin")).expect("bin");
    let img = prepare(tmp.path(), &tmp.path().join("cache")).expect("plain");
    assert_eq!(img.rootfs, tmp.path());
    assert!(img.is_plain_dir() && img.config == ImageConfig::default());
    assert!(!tmp.path().join("cache").exists());
}

#[test]
fn unpacked_images_are_private_to_root() {
    use std::os::unix::fs::PermissionsExt;
    // Layers may hold setuid binaries and device nodes: no other host user may reach
    // them through the cache.
    let tmp = tempfile::tempdir().expect("tmp");
    let tarball = tmp.path().join("img.tar");
    write_tar(&tarball, &docker_save_files());
    let img = prepare(&tarball, &tmp.path().join("cache")).expect("prepare");
    let image_dir = img.rootfs.parent().expect("image dir");
    let mode = std::fs::metadata(image_dir).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{} is mode {mode:o}", image_dir.display());
    let cache_mode = std::fs::metadata(tmp.path().join("cache")).expect("stat").permissions().mode() & 0o777;
    assert_eq!(cache_mode & 0o022, 0, "cache dir is writable by others: {cache_mode:o}");
}

#[test]
fn an_image_bigger_than_the_cap_is_refused_naming_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let tarball = tmp.path().join("img.tar");
    write_tar(&tarball, &docker_save_files());
    let source = Source::tar(&tarball).expect("source");
    let plan = plan(&source, &tarball).expect("plan");
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).expect("root");
    // The two small test layers unpack to a few KiB of tar: a 1 KiB cap is exceeded.
    let e = apply_all_capped(&source, &plan.layers, &root, Caps { bytes: 1024, ..CAPS }).expect_err("over the cap");
    let chain = format!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
    let mut inner: &dyn std::error::Error = &e;
    while let Some(s) = inner.source() {
        inner = s;
    }
    assert!(inner.to_string().contains("more than"), "{chain} / {inner}");
    // The same image fits the real cap.
    let root2 = tmp.path().join("root2");
    std::fs::create_dir(&root2).expect("root2");
    apply_all(&source, &plan.layers, &root2).expect("under the cap");
}

/// Runs `f` on its own thread and fails if it has not returned within a minute: a
/// guard so that a hang fails the test instead of stalling the suite, not a timing
/// assertion.
fn without_hanging<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(60)).unwrap_or_else(|_| panic!("{what}: still reading after a minute"))
}

#[test]
fn blobs_that_are_not_regular_files_are_refused_naming_them() {
    let tmp = tempfile::tempdir().expect("tmp");
    let files = oci_files("application/vnd.oci.image.layer.v1.tar");
    let (l1, l2) = (layer1(), layer2());
    let layer = format!("blobs/sha256/{}", sha256_hex(&l2));
    let config = format!("blobs/sha256/{}", sha256_hex(&config_json(&[&l1, &l2])));
    let cases: &[(&str, &str, &str)] = &[
        ("layer-symlink-to-dev-zero", &layer, "is a symlink"),
        ("config-symlink-to-dev-zero", &config, "is a symlink"),
        ("layer-fifo", &layer, "is a FIFO, not a regular file"),
        ("config-fifo", &config, "is a FIFO, not a regular file"),
        ("layer-symlink-to-fifo", &layer, "is a symlink"),
        ("layer-directory", &layer, "is a directory, not a regular file"),
        // The first blob read (the nested index) is refused already.
        ("blobs-dir-symlink-outside", "blobs/sha256/", "leads outside the image"),
    ];
    for (case, blob, want) in cases {
        let dir = tmp.path().join(case);
        write_dir(&dir, &files);
        let path = dir.join(if blob.ends_with('/') { layer.as_str() } else { blob });
        std::fs::remove_file(&path).expect("remove blob");
        match *case {
            "layer-fifo" | "config-fifo" => nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo"),
            "layer-symlink-to-fifo" => {
                nix::unistd::mkfifo(&dir.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
                std::os::unix::fs::symlink("../../fifo", &path).expect("symlink");
            }
            "layer-directory" => std::fs::create_dir(&path).expect("mkdir"),
            "blobs-dir-symlink-outside" => {
                // The whole blobs/sha256 directory leads to a copy outside the image.
                let outside = tmp.path().join(format!("{case}-outside"));
                std::fs::rename(dir.join("blobs/sha256"), &outside).expect("move blobs");
                std::fs::write(outside.join(path.file_name().expect("name")), &l2).expect("layer");
                std::os::unix::fs::symlink(&outside, dir.join("blobs/sha256")).expect("symlink");
            }
            _ => std::os::unix::fs::symlink("/dev/zero", &path).expect("symlink"),
        }
        let cache = tmp.path().join(format!("cache-{case}"));
        let e = without_hanging(case, move || prepare(&dir, &cache).map(|_| ()).map_err(|e| crate::error_chain(&e)));
        let e = e.expect_err(case);
        assert!(e.contains(&format!("image file {blob}")) && e.contains(want), "{case}: {e}");
    }
    // The image itself must be a file or a directory: a FIFO would block the open.
    let fifo = tmp.path().join("image.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let cache = tmp.path().join("cache-fifo-image");
    let e = without_hanging("a FIFO as the image", move || prepare(&fifo, &cache).map(|_| ()).map_err(|e| e.to_string()));
    assert!(e.expect_err("FIFO image").contains("neither a regular file nor a directory"));
}

#[test]
fn the_entries_of_all_layers_together_are_capped() {
    let tmp = tempfile::tempdir().expect("tmp");
    let tarball = tmp.path().join("img.tar");
    write_tar(&tarball, &docker_save_files());
    let source = Source::tar(&tarball).expect("source");
    let plan = plan(&source, &tarball).expect("plan");
    // Layer 1 has 4 entries and layer 2 has 2: each is far below the per-layer cap,
    // together they are one above a total cap of 5.
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).expect("root");
    let e = apply_all_capped(&source, &plan.layers, &root, Caps { entries: 5, ..CAPS }).expect_err("6 entries over a cap of 5");
    let chain = crate::error_chain(&e);
    assert!(chain.contains("the image has more than 5 entries in all its layers"), "{chain}");
    let root = tmp.path().join("root2");
    std::fs::create_dir(&root).expect("root2");
    apply_all_capped(&source, &plan.layers, &root, Caps { entries: 6, ..CAPS }).expect("6 entries within a cap of 6");
    assert_eq!(CAPS.entries, 4 << 20);
}

#[test]
fn a_prepared_image_stays_in_the_cache_until_its_run_ends() {
    let tmp = tempfile::tempdir().expect("tmp");
    let tarball = tmp.path().join("img.tar");
    write_tar(&tarball, &docker_save_files());
    let cache_dir = tmp.path().join("cache");
    let img = prepare(&tarball, &cache_dir).expect("prepare");
    assert!(img.unpacked && img.lease.is_some());
    let again = prepare(&tarball, &cache_dir).expect("prepare again");
    assert!(!again.unpacked, "the second run uses the cached unpack");
    drop(again);
    let listed = cache::list(&cache_dir).expect("list");
    assert_eq!(listed.len(), 1);
    assert!(listed[0].in_use && listed[0].bytes > 0, "{listed:?}");
    assert_eq!(listed[0].source.as_deref(), Some(std::fs::canonicalize(&tarball).expect("canon").to_str().expect("utf-8")));
    let r = cache::prune(&cache_dir, cache::Prune::All).expect("prune");
    assert!(r.removed.is_empty() && img.rootfs.join("bin/sh").is_file(), "an image in use was pruned");
    drop(img);
    let r = cache::prune(&cache_dir, cache::Prune::All).expect("prune");
    assert_eq!(r.removed.len(), 1);
    assert!(cache::list(&cache_dir).expect("list").is_empty());
    // Plain directories are not cached, so nothing holds them.
    assert!(prepare(tmp.path(), &cache_dir).expect("plain dir").lease.is_none());
}
