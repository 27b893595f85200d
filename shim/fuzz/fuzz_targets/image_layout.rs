//! Whole images as `moat run` takes them: an OCI image layout or a docker-save
//! archive, as a directory or a tar, with hostile index, manifest, config and layers,
//! through `image::prepare` (parsing, digest checks, unpacking into the cache).
//!
//! Input: `kind u8` (bit 0: docker-save, else OCI; bit 1: a tar archive, else a
//! directory; bit 2: OCI layers gzip-compressed), then sections of `len u16` bytes:
//! the index (`index.json`; `manifest.json` for docker-save), the image manifest
//! (OCI), the config, then `n u8` (0-4) layers (tar streams). So that the fuzzer gets
//! past the digest checks, the harness fills in placeholders: in the config `@D<i>`
//! (layer i's diff id); in the manifest `@C` and `#C` (the config's digest and size)
//! and `@L<i>`, `#L<i>` (layer i's blob); in the index `@M`, `#M` (the manifest's), and
//! for docker-save `@CH` (the config's hex digest; it is also stored as
//! `config.json`); layers are `layer<i>.tar` there.
//!
//! The process runs in a mount namespace where only the temporary directory and
//! libFuzzer's output are writable (`confine`). Checked: no panic; a prepared image's
//! root lies in the cache, its digest is `sha256:<64 hex>`, and preparing it again
//! finds it cached; nothing is created or changed outside the cache and the image.
//! With `MOAT_FUZZ_VERBOSE` set, each input's outcome is printed (to check seeds).
#![no_main]

use std::io::Write;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use moat_shim::image::prepare;
use moat_shim_fuzz::{confine, Reader, Scratch};
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn fill(text: &str, values: &[(String, String)]) -> Vec<u8> {
    let mut t = text.to_string();
    for (k, v) in values {
        t = t.replace(k.as_str(), v);
    }
    t.into_bytes()
}

fn write(path: &Path, bytes: &[u8]) {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).expect("image dir");
    }
    std::fs::write(path, bytes).expect("image file");
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).expect("gzip");
    gz.finish().expect("gzip")
}

fn run(data: &[u8]) {
    confine();
    let mut r = Reader::new(data);
    let kind = r.u8();
    let (docker, archive, gz) = (kind & 1 != 0, kind & 2 != 0, kind & 4 != 0);
    let (index, manifest, config) = (r.text(), r.text(), r.text());
    let layers: Vec<Vec<u8>> = (0..r.u8() % 5).map(|_| r.section().to_vec()).collect();

    let scratch = Scratch::new();
    let dir = scratch.dir.path().join("image");
    let mut values = Vec::new();
    let blobs: Vec<Vec<u8>> = layers.iter().map(|l| if gz && !docker { gzip(l) } else { l.clone() }).collect();
    for (i, (layer, blob)) in layers.iter().zip(&blobs).enumerate() {
        values.push((format!("@D{i}"), format!("sha256:{}", hex(layer))));
        values.push((format!("@L{i}"), format!("sha256:{}", hex(blob))));
        values.push((format!("#L{i}"), blob.len().to_string()));
    }
    let config = fill(&config, &values);
    let config_hex = hex(&config);
    values.push(("@CH".into(), config_hex.clone()));
    values.push(("@C".into(), format!("sha256:{config_hex}")));
    values.push(("#C".into(), config.len().to_string()));
    let manifest = fill(&manifest, &values);
    values.push(("@M".into(), format!("sha256:{}", hex(&manifest))));
    values.push(("#M".into(), manifest.len().to_string()));
    let index = fill(&index, &values);
    if docker {
        write(&dir.join("manifest.json"), &index);
        write(&dir.join("config.json"), &config);
        write(&dir.join(format!("{config_hex}.json")), &config);
        for (i, blob) in blobs.iter().enumerate() {
            write(&dir.join(format!("layer{i}.tar")), blob);
        }
    } else {
        write(&dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#);
        write(&dir.join("index.json"), &index);
        for blob in [&manifest, &config].into_iter().chain(&blobs) {
            write(&dir.join("blobs/sha256").join(hex(blob)), blob);
        }
    }
    let mut extra = vec!["image"];
    let image = if archive {
        let path = scratch.dir.path().join("image.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&path).expect("image.tar"));
        b.append_dir_all(".", &dir).expect("archive the image");
        b.finish().expect("archive the image");
        extra.push("image.tar");
        path
    } else {
        dir
    };

    let cache = scratch.root();
    let prepared = prepare(&image, &cache);
    if std::env::var_os("MOAT_FUZZ_VERBOSE").is_some() {
        // For checking that a seed gets as far as it should.
        eprintln!("prepare: {:?}", prepared.as_ref().map(|i| &i.config).map_err(|e| moat_shim::error_chain(e)));
    }
    if let Ok(img) = prepared {
        assert!(img.rootfs.starts_with(&cache), "image root {} outside the cache", img.rootfs.display());
        let digest = img.digest.clone().expect("an unpacked image has a digest");
        let h = digest.strip_prefix("sha256:").expect("sha256 digest");
        assert!(h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()), "digest {digest:?}");
        drop(img);
        let again = prepare(&image, &cache).expect("the same image a second time");
        assert!(!again.unpacked, "the image was not found in the cache");
    }
    scratch.check_untouched(&extra);
}

fuzz_target!(|data: &[u8]| run(data));
