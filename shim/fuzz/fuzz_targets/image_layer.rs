//! The image layer unpacker on hostile layers: entry names and link targets that
//! climb out with `..` or absolute paths, symlinks planted for later entries to
//! follow, hard links out of the root, whiteouts and opaque directories, device nodes,
//! set-ID modes, long names, odd entry types, over one or more layers.
//!
//! Input: `mode u8`. With bit 0 set, the rest is one layer's tar stream as it is.
//! Otherwise the harness writes the tar (checksums right, GNU long names where
//! needed) from entries, each `kind u8` (modulo 9: file, hard link, symlink, char
//! device, block device, directory, FIFO, end of layer, or a raw type flag in the
//! next byte), `mode u16`, `uid u8`, `gid u8`, then sections of `len u16` bytes:
//! name, link target, data. `@OUT` in a name or target stands for the absolute path
//! of a directory beside the root that must stay untouched.
//!
//! The process runs in a mount namespace where only the temporary directory and
//! libFuzzer's output are writable (`confine`). Checked: no panic; nothing is created
//! or changed beside the root or in the directory beside it, whose sentinel file keeps
//! its contents and is never hard-linked into the root.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use moat_shim::image::unpack::{apply_layer, EntryBudget};
use moat_shim_fuzz::{confine, Reader, Scratch};

const MAX_ENTRIES: usize = 64;

/// Appends one tar entry with a raw name and link target (no checks: hostile on
/// purpose), preceded by GNU long-name entries when they do not fit the header.
fn append(tar: &mut Vec<u8>, kind: tar::EntryType, name: &[u8], link: &[u8], mode: u32, owner: (u64, u64), data: &[u8]) {
    if name.len() > 100 {
        append(tar, tar::EntryType::GNULongName, b"././@LongLink", b"", 0o644, (0, 0), &[name, b"\0"].concat());
    }
    if link.len() > 100 {
        append(tar, tar::EntryType::GNULongLink, b"././@LongLink", b"", 0o644, (0, 0), &[link, b"\0"].concat());
    }
    let mut h = tar::Header::new_gnu();
    {
        let old = h.as_old_mut();
        let n = name.len().min(old.name.len());
        old.name[..n].copy_from_slice(&name[..n]);
        let n = link.len().min(old.linkname.len());
        old.linkname[..n].copy_from_slice(&link[..n]);
    }
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(owner.0);
    h.set_gid(owner.1);
    h.set_mtime(0);
    if kind.is_character_special() || kind.is_block_special() {
        let _ = h.set_device_major(u32::from(data.first().copied().unwrap_or(1)));
        let _ = h.set_device_minor(u32::from(data.get(1).copied().unwrap_or(3)));
    }
    let no_data = kind.is_hard_link()
        || kind.is_symlink()
        || kind.is_dir()
        || kind.is_character_special()
        || kind.is_block_special()
        || kind.is_fifo();
    let data = if no_data { &[] } else { data };
    h.set_size(data.len() as u64);
    h.set_cksum();
    tar.extend_from_slice(h.as_bytes());
    tar.extend_from_slice(data);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
}

fn finish(tar: &mut Vec<u8>) {
    tar.extend_from_slice(&[0u8; 1024]);
}

fn run(data: &[u8]) {
    confine();
    let mut r = Reader::new(data);
    let scratch = Scratch::new();
    let mode = r.u8();
    let mut layers = Vec::new();
    if mode & 1 != 0 {
        layers.push(r.rest().to_vec());
    } else {
        let mut tar = Vec::new();
        for _ in 0..MAX_ENTRIES {
            if r.is_empty() {
                break;
            }
            let kind = match r.u8() % 9 {
                0 => tar::EntryType::Regular,
                1 => tar::EntryType::Link,
                2 => tar::EntryType::Symlink,
                3 => tar::EntryType::Char,
                4 => tar::EntryType::Block,
                5 => tar::EntryType::Directory,
                6 => tar::EntryType::Fifo,
                7 => {
                    finish(&mut tar);
                    layers.push(std::mem::take(&mut tar));
                    continue;
                }
                _ => tar::EntryType::new(r.u8()),
            };
            let mode = u32::from(r.u16());
            let owner = (u64::from(r.u8()), u64::from(r.u8()));
            let name = scratch.aim(r.section());
            let link = scratch.aim(r.section());
            append(&mut tar, kind, &name, &link, mode, owner, r.section());
        }
        finish(&mut tar);
        layers.push(tar);
    }
    let mut budget = EntryBudget::new(4 * MAX_ENTRIES);
    for layer in &layers {
        if apply_layer(&scratch.root(), Cursor::new(layer), &mut budget).is_err() {
            break;
        }
    }
    scratch.check_untouched(&[]);
}

fuzz_target!(|data: &[u8]| run(data));
