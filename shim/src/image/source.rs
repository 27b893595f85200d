//! Where an image's files come from: a directory, or a tar archive read in place
//! (docker save, or an OCI layout packed as a tar) without unpacking it first.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use super::ImageError;

/// A tree of named files: an image directory or an image tarball.
pub enum Source {
    Dir(PathBuf),
    Tar { path: PathBuf, members: HashMap<String, Member> },
}

/// A regular file inside a tarball: where its bytes start and how many there are.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    offset: u64,
    size: u64,
}

/// How deep a chain of symlinks between tar members may go (docker save links
/// duplicate layers).
const MAX_MEMBER_LINKS: usize = 8;

impl Source {
    /// Indexes a tarball's regular files (and its symlinks to them).
    pub fn tar(path: &Path) -> Result<Source, ImageError> {
        let err = |source| ImageError::Io { what: format!("cannot read image archive {}", path.display()), source };
        let file = File::open(path).map_err(err)?;
        let mut archive = tar::Archive::new(file);
        let mut members = HashMap::new();
        let mut links: Vec<(String, String)> = Vec::new();
        for entry in archive.entries_with_seek().map_err(err)? {
            let entry = entry.map_err(err)?;
            let raw = entry.path_bytes();
            let Some(name) = member_name(&String::from_utf8_lossy(&raw)) else { continue };
            let kind = entry.header().entry_type();
            if kind.is_file() || kind.is_contiguous() {
                members.insert(name, Member { offset: entry.raw_file_position(), size: entry.size() });
            } else if kind.is_symlink() {
                if let Some(target) = entry.link_name().ok().flatten() {
                    let dir = Path::new(&name).parent().unwrap_or(Path::new("")).to_path_buf();
                    let joined = dir.join(target);
                    if let Some(t) = member_name(&joined.to_string_lossy()) {
                        links.push((name, t));
                    }
                }
            }
        }
        for _ in 0..MAX_MEMBER_LINKS {
            let mut changed = false;
            for (name, target) in &links {
                if !members.contains_key(name) {
                    if let Some(m) = members.get(target).copied() {
                        members.insert(name.clone(), m);
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        Ok(Source::Tar { path: path.to_path_buf(), members })
    }

    pub fn exists(&self, name: &str) -> bool {
        match (self, member_name(name)) {
            (Source::Dir(d), Some(n)) => d.join(n).is_file(),
            (Source::Tar { members, .. }, Some(n)) => members.contains_key(&n),
            (_, None) => false,
        }
    }

    /// Opens a file by its name inside the image; returns the reader and its size.
    pub fn open(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64), ImageError> {
        let clean = member_name(name).ok_or_else(|| ImageError::Invalid(format!("image names a file outside itself: {name:?}")))?;
        let missing = || ImageError::Invalid(format!("image has no file {clean:?}"));
        match self {
            Source::Dir(d) => {
                let f = open_beneath(d, &clean).map_err(|e| match e {
                    rustix::io::Errno::NOENT => missing(),
                    rustix::io::Errno::LOOP => ImageError::Invalid(format!("image file {clean} is a symlink; moat reads image files only as regular files")),
                    rustix::io::Errno::XDEV => ImageError::Invalid(format!("image file {clean} leads outside the image through a symlink")),
                    e => ImageError::Io { what: format!("cannot open {}", d.join(&clean).display()), source: e.into() },
                })?;
                let meta = f.metadata().map_err(|source| ImageError::Io { what: format!("cannot stat {}", d.join(&clean).display()), source })?;
                if !meta.is_file() {
                    return Err(ImageError::Invalid(format!("image file {clean} is {}, not a regular file", file_kind(&meta.file_type()))));
                }
                Ok((Box::new(f), meta.len()))
            }
            Source::Tar { path, members } => {
                let m = members.get(&clean).ok_or_else(missing)?;
                let err = |source| ImageError::Io { what: format!("cannot read {clean} in {}", path.display()), source };
                let mut f = File::open(path).map_err(err)?;
                f.seek(SeekFrom::Start(m.offset)).map_err(err)?;
                Ok((Box::new(f.take(m.size)), m.size))
            }
        }
    }

    /// Reads a small file (a manifest or config) whole, refusing one over `max` bytes.
    pub fn read_small(&self, name: &str, max: u64) -> Result<Vec<u8>, ImageError> {
        let (r, size) = self.open(name)?;
        if size > max {
            return Err(ImageError::Invalid(format!("{name} is {size} bytes; the limit is {max}")));
        }
        let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        r.take(max + 1)
            .read_to_end(&mut buf)
            .map_err(|source| ImageError::Io { what: format!("cannot read {name}"), source })?;
        Ok(buf)
    }
}

/// Opens `name` below the directory `dir` for reading, never leaving it: a final
/// symlink is refused (O_NOFOLLOW), symlinks on the way must stay below `dir`, and
/// O_NONBLOCK keeps a FIFO from blocking the open, so the caller can look at what it
/// got before reading from it.
fn open_beneath(dir: &Path, name: &str) -> rustix::io::Result<File> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let dir = rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = rustix::fs::openat2(&dir, name, flags, Mode::empty(), ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS)?;
    Ok(File::from(fd))
}

/// What a file that is not a regular file is, for messages.
fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "of an unknown kind"
    }
}

/// A member name as a clean relative path (`./a//b` -> `a/b`); None if it climbs
/// out or names nothing.
pub fn member_name(name: &str) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::RootDir if parts.is_empty() => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            _ => return None,
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join("/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_are_cleaned_and_bounded() {
        assert_eq!(member_name("./a//b").as_deref(), Some("a/b"));
        assert_eq!(member_name("a/../b").as_deref(), Some("b"));
        assert_eq!(member_name("/manifest.json").as_deref(), Some("manifest.json"));
        assert_eq!(member_name("../x"), None);
        assert_eq!(member_name("a/../../x"), None);
        assert_eq!(member_name("."), None);
    }
}
