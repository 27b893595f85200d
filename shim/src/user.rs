//! Resolving `-u USER[:GROUP]` against a container's own /etc/passwd and /etc/group,
//! as Docker does: names come from the image, never from the host.

use std::path::Path;

use crate::image::unpack::resolve;

/// Longest passwd or group file read (they are hostile input from the image).
const MAX_DB_FILE: u64 = 4 << 20;

/// The identity a container process runs as.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// From passwd, for $HOME; "/" when the user has no entry.
    pub home: String,
}

/// Why a user could not be resolved.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("unknown user {0:?}: no such name in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("unknown group {0:?}: no such name in the image's /etc/group")]
    UnknownGroup(String),
    #[error("invalid user {0:?}: want UID[:GID] or NAME[:GROUP]")]
    Invalid(String),
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// Reads a file of the container's root (symlinks resolved inside the root); a
/// missing or unreadable file, or anything but a regular file, reads as empty. The
/// image is hostile: a FIFO there must not hang `moat`, nor a device node be read.
fn read_in_root(root: &Path, rel: &str) -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(path) = resolve(root, Path::new(rel), true) else { return String::new() };
    let mut text = String::new();
    let opened = std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW).open(path);
    if let Ok(f) = opened {
        if f.metadata().is_ok_and(|m| m.is_file()) {
            let _ = f.take(MAX_DB_FILE).read_to_string(&mut text);
        }
    }
    text
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry { name: f[0].to_string(), uid: f[2].parse().ok()?, gid: f[3].parse().ok()?, home: f[5].to_string() })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let members = f[3].split(',').filter(|m| !m.is_empty()).map(str::to_string).collect();
            Some(GroupEntry { name: f[0].to_string(), gid: f[2].parse().ok()?, members })
        })
        .collect()
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Resolves `spec` (`UID`, `UID:GID`, `NAME`, `NAME:GROUP`, or empty for root) in the
/// root directory `root`.
pub fn resolve_user(root: &Path, spec: &str) -> Result<User, UserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if spec.is_empty() {
        return resolve_user(root, "0");
    }
    if user.is_empty() || group.is_some_and(str::is_empty) || spec.contains(['\n', '\0']) {
        return Err(UserError::Invalid(spec.to_string()));
    }
    let passwd = parse_passwd(&read_in_root(root, "etc/passwd"));
    let groups = parse_group(&read_in_root(root, "etc/group"));
    let entry = if is_number(user) {
        let uid: u32 = user.parse().map_err(|_| UserError::Invalid(spec.to_string()))?;
        match passwd.iter().find(|p| p.uid == uid) {
            Some(p) => Some(p),
            None => {
                // A numeric uid need not exist in the image.
                return Ok(User { uid, gid: resolve_group(&groups, group, 0, spec)?, additional_gids: Vec::new(), home: "/".into() });
            }
        }
    } else {
        Some(passwd.iter().find(|p| p.name == user).ok_or_else(|| UserError::UnknownUser(user.to_string()))?)
    };
    let Some(entry) = entry else { return Err(UserError::UnknownUser(user.to_string())) };
    let gid = resolve_group(&groups, group, entry.gid, spec)?;
    let mut additional: Vec<u32> = groups.iter().filter(|g| g.members.contains(&entry.name)).map(|g| g.gid).collect();
    // With an explicit group, Docker drops the supplementary groups; without one, the
    // primary group is listed too.
    if group.is_some() {
        additional.clear();
    } else if !additional.is_empty() && !additional.contains(&gid) {
        additional.insert(0, gid);
    }
    additional.dedup();
    let home = if entry.home.is_empty() { "/".to_string() } else { entry.home.clone() };
    Ok(User { uid: entry.uid, gid, additional_gids: additional, home })
}

fn resolve_group(groups: &[GroupEntry], group: Option<&str>, default: u32, spec: &str) -> Result<u32, UserError> {
    match group {
        None => Ok(default),
        Some(g) if is_number(g) => g.parse().map_err(|_| UserError::Invalid(spec.to_string())),
        Some(g) => groups.iter().find(|e| e.name == g).map(|e| e.gid).ok_or_else(|| UserError::UnknownGroup(g.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(t.path().join("etc")).expect("etc");
        std::fs::write(
            t.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\nbroken line\nbob:x:1001:100:::\n",
        )
        .expect("passwd");
        std::fs::write(t.path().join("etc/group"), "root:x:0:\nusers:x:100:alice\nalice:x:1000:\nwheel:x:10:alice,bob\n").expect("group");
        t
    }

    #[test]
    fn names_and_numbers() {
        let t = root();
        let r = |s| resolve_user(t.path(), s);
        assert_eq!(r("").expect("root"), User { uid: 0, gid: 0, additional_gids: vec![], home: "/root".into() });
        let alice = r("alice").expect("alice");
        assert_eq!((alice.uid, alice.gid, alice.home.as_str()), (1000, 1000, "/home/alice"));
        assert_eq!(alice.additional_gids, vec![1000, 100, 10]);
        assert_eq!(r("alice:wheel").expect("alice:wheel").gid, 10);
        assert!(r("alice:wheel").expect("group").additional_gids.is_empty());
        assert_eq!(r("1000").expect("uid").uid, 1000);
        assert_eq!(r("1000").expect("uid").gid, 1000, "primary gid from passwd");
        let n = r("4242:7").expect("numeric not in passwd");
        assert_eq!((n.uid, n.gid, n.home.as_str()), (4242, 7, "/"));
        assert_eq!(r("4242").expect("bare uid").gid, 0);
        assert_eq!(r("bob").expect("bob").home, "/");
    }

    #[test]
    fn unknown_and_bad_specs() {
        let t = root();
        let r = |s| resolve_user(t.path(), s);
        assert_eq!(r("mallory"), Err(UserError::UnknownUser("mallory".into())));
        assert_eq!(r("alice:nogroup"), Err(UserError::UnknownGroup("nogroup".into())));
        assert!(matches!(r(":1"), Err(UserError::Invalid(_))));
        assert!(matches!(r("1:"), Err(UserError::Invalid(_))));
        assert!(matches!(r("99999999999"), Err(UserError::Invalid(_))));
        assert!(r("mallory").expect_err("unknown").to_string().contains("/etc/passwd"));
    }

    #[test]
    fn a_fifo_for_passwd_reads_as_empty_instead_of_hanging() {
        let t = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(t.path().join("etc")).expect("etc");
        nix::unistd::mkfifo(&t.path().join("etc/passwd"), nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
        assert_eq!(resolve_user(t.path(), "alice"), Err(UserError::UnknownUser("alice".into())));
    }

    #[test]
    fn passwd_behind_a_symlink_out_of_the_root_is_not_the_hosts() {
        let t = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(t.path().join("etc")).expect("etc");
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("etc/passwd")).expect("symlink");
        // The host's /etc/passwd has root; the image has no passwd at all.
        assert_eq!(resolve_user(t.path(), "root"), Err(UserError::UnknownUser("root".into())));
    }
}
