//! Helpers shared by the shim's fuzz targets: a reader over the fuzz input, a
//! scratch area with a sentinel outside the directory under test, and a mount
//! namespace in which nothing but the temporary directory and libFuzzer's own output
//! is writable (the image targets unpack hostile layers as root).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Once;

/// Reads numbers and length-prefixed byte strings off the fuzz input; past its end
/// everything reads as zero or empty, so any input decodes.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | (u16::from(self.u8()) << 8)
    }
    pub fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | (u32::from(self.u16()) << 16)
    }
    /// A byte string of `len u16` bytes.
    pub fn section(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16());
        self.bytes(n)
    }
    /// A section as text (invalid UTF-8 replaced).
    pub fn text(&mut self) -> String {
        String::from_utf8_lossy(self.section()).into_owned()
    }
}

/// A temporary directory for one iteration holding `root/` (what the code under test
/// may write) and `outside/sentinel`, which it must never reach. Removed on drop.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

const SENTINEL: &[u8] = b"outside the root: never written\n";

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::Builder::new().prefix("moat-fuzz-").tempdir().expect("a temporary directory");
        std::fs::create_dir(dir.path().join("root")).expect("root");
        std::fs::create_dir(dir.path().join("outside")).expect("outside");
        std::fs::write(dir.path().join("outside/sentinel"), SENTINEL).expect("sentinel");
        Scratch { dir }
    }
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    pub fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    /// Replaces `@OUT` in a name or link target by the absolute path of `outside/`,
    /// so that the fuzzer can aim at a place that is checked afterwards.
    pub fn aim(&self, raw: &[u8]) -> Vec<u8> {
        let out = self.outside();
        let out = out.as_os_str().as_encoded_bytes();
        let mut v = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            if raw[i..].starts_with(b"@OUT") {
                v.extend_from_slice(out);
                i += 4;
            } else {
                v.push(raw[i]);
                i += 1;
            }
        }
        v
    }

    /// Asserts that nothing happened outside `root/` (and `extra`, other entries the
    /// target made itself): the scratch directory holds just those, `outside/` just the
    /// sentinel, unchanged and not hard-linked from anywhere.
    pub fn check_untouched(&self, extra: &[&str]) {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .expect("scratch dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut want: Vec<String> = ["outside", "root"].iter().chain(extra).map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(names, want, "something was created beside the root");
        let inside: Vec<_> = std::fs::read_dir(self.outside()).expect("outside").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(inside, vec![std::ffi::OsString::from("sentinel")], "something was created outside the root");
        let sentinel = self.outside().join("sentinel");
        let meta = std::fs::symlink_metadata(&sentinel).expect("sentinel");
        assert!(meta.is_file() && meta.nlink() == 1, "the sentinel was replaced or hard-linked");
        assert_eq!(std::fs::read(&sentinel).expect("sentinel"), SENTINEL, "the sentinel was written");
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

/// Puts the calling thread (libFuzzer runs every input on it) into a mount namespace
/// of its own in which every mount is read-only except the temporary directory and
/// the directories libFuzzer writes to (the first corpus directory and the artifact
/// path from the command line), so that a layer escaping its root cannot damage the host even as root.
/// Without the privilege for it (not root), says so once and runs unconfined.
pub fn confine() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = try_confine() {
            eprintln!("moat-fuzz: WARNING: running unconfined ({e}); a layer that escapes its root could write anywhere");
        }
    });
}

fn writable_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![std::env::temp_dir()];
    // libFuzzer adds new inputs to the first corpus directory only.
    let mut first_corpus = true;
    for arg in std::env::args().skip(1) {
        let path = match arg.strip_prefix("-artifact_prefix=").or_else(|| arg.strip_prefix("-exact_artifact_path=")) {
            Some(p) => {
                let p = PathBuf::from(p);
                if p.is_dir() {
                    p
                } else {
                    p.parent().filter(|d| !d.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_path_buf)
                }
            }
            None if !arg.starts_with('-') && first_corpus => {
                first_corpus = false;
                PathBuf::from(arg)
            }
            None => continue,
        };
        if path.is_dir() {
            dirs.push(path);
        }
    }
    dirs.into_iter().filter_map(|d| std::fs::canonicalize(d).ok()).collect()
}

fn try_confine() -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    let none = None::<&str>;
    let writable = writable_dirs();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare: {e}"))?;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).map_err(|e| format!("making / private: {e}"))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("mountinfo: {e}"))?;
    for point in info.lines().filter_map(|l| l.split(' ').nth(4)) {
        let point = moat_shim::helper::unescape_mountinfo(point);
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
        if let Err(e) = mount(none, point.as_str(), none, flags, none) {
            // A mount stacked over by another is not reachable by its path anyway.
            eprintln!("moat-fuzz: cannot make {point} read-only: {e}");
        }
    }
    for dir in &writable {
        mount(Some(dir.as_path()), dir.as_path(), none, MsFlags::MS_BIND | MsFlags::MS_REC, none)
            .and_then(|()| mount(none, dir.as_path(), none, MsFlags::MS_REMOUNT | MsFlags::MS_BIND, none))
            .map_err(|e| format!("keeping {} writable: {e}", dir.display()))?;
    }
    // Prove it: the root directory must now refuse a new file.
    let probe = Path::new("/.moat-fuzz-probe");
    match std::fs::OpenOptions::new().write(true).create_new(true).open(probe) {
        Err(e) if e.raw_os_error() == Some(nix::libc::EROFS) => {}
        Ok(_) => {
            let _ = std::fs::remove_file(probe);
            return Err("/ is still writable".into());
        }
        Err(e) => return Err(format!("probing /: {e}")),
    }
    eprintln!("moat-fuzz: confined; writable: {writable:?}");
    Ok(())
}
