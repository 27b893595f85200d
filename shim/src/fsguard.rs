//! A seccomp filter for the virtio-fs backend that serves host directories a user
//! shares with the guest (volumes, a root directory used in place).
//!
//! virtiofsd acts as root on the guest's behalf, so without this a guest's root could
//! leave set-user-ID or set-group-ID programs, or device nodes, in a host directory
//! that host users run things from. The filter is installed by the helper before it
//! execs virtiofsd (filters survive exec and stack with virtiofsd's own), and refuses
//! with EPERM every call that would give a file those bits:
//! - chmod, fchmod, fchmodat, fchmodat2 with S_ISUID or S_ISGID in the mode;
//! - open/openat/creat that create a file (O_CREAT, O_TMPFILE) with either bit;
//! - mknod/mknodat of a character or block device, or with either bit;
//! - mkdir/mkdirat with S_ISUID (a set-group-ID directory only passes its group on);
//! - setxattr and friends (no file capabilities: virtiofsd serves no xattrs here).
//!
//! openat2 carries its mode inside a struct the filter cannot read, so it answers
//! ENOSYS: virtiofsd then uses openat, which the filter can check (its sandbox already
//! confines path resolution to the share).

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch};

const S_ISUID: u64 = 0o4000;
const S_ISGID: u64 = 0o2000;
const S_IFMT: u64 = 0o170000;
const S_IFCHR: u64 = 0o020000;
const S_IFBLK: u64 = 0o060000;
const O_CREAT: u64 = libc::O_CREAT as u64;
/// O_TMPFILE without O_DIRECTORY (the bit that makes it a tmpfile).
const O_TMPFILE_BIT: u64 = (libc::O_TMPFILE & !libc::O_DIRECTORY) as u64;
/// fchmodat2(2), Linux 6.6 (not in every libc yet).
const SYS_FCHMODAT2: i64 = 452;

#[derive(Debug, thiserror::Error)]
pub enum FsGuardError {
    #[error("cannot build the fs backend's seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("cannot install the fs backend's seccomp filter")]
    Install(#[source] seccompiler::Error),
}

fn bits(arg: u8, mask: u64) -> Result<SeccompCondition, FsGuardError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(mask), mask).map_err(FsGuardError::Build)
}

fn kind(arg: u8, kind: u64) -> Result<SeccompCondition, FsGuardError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(S_IFMT), kind).map_err(FsGuardError::Build)
}

fn rule(c: Vec<SeccompCondition>) -> Result<SeccompRule, FsGuardError> {
    SeccompRule::new(c).map_err(FsGuardError::Build)
}

/// Rules matching a mode argument `arg` with S_ISUID or S_ISGID, each also requiring
/// the conditions in `and`.
fn setid_mode(arg: u8, and: &[SeccompCondition]) -> Result<Vec<SeccompRule>, FsGuardError> {
    [S_ISUID, S_ISGID]
        .iter()
        .map(|&b| {
            let mut c = and.to_vec();
            c.push(bits(arg, b)?);
            rule(c)
        })
        .collect()
}

/// The two programs, to be installed in this order.
pub fn programs() -> Result<[BpfProgram; 2], FsGuardError> {
    let mut eperm: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    eperm.insert(libc::SYS_chmod, setid_mode(1, &[])?);
    eperm.insert(libc::SYS_fchmod, setid_mode(1, &[])?);
    eperm.insert(libc::SYS_fchmodat, setid_mode(2, &[])?);
    eperm.insert(SYS_FCHMODAT2, setid_mode(2, &[])?);
    eperm.insert(libc::SYS_creat, setid_mode(1, &[])?);
    let mut open = setid_mode(2, &[bits(1, O_CREAT)?])?;
    open.extend(setid_mode(2, &[bits(1, O_TMPFILE_BIT)?])?);
    eperm.insert(libc::SYS_open, open);
    let mut openat = setid_mode(3, &[bits(2, O_CREAT)?])?;
    openat.extend(setid_mode(3, &[bits(2, O_TMPFILE_BIT)?])?);
    eperm.insert(libc::SYS_openat, openat);
    for (nr, mode) in [(libc::SYS_mknod, 1), (libc::SYS_mknodat, 2)] {
        let mut r = setid_mode(mode, &[])?;
        r.push(rule(vec![kind(mode, S_IFCHR)?])?);
        r.push(rule(vec![kind(mode, S_IFBLK)?])?);
        eperm.insert(nr, r);
    }
    eperm.insert(libc::SYS_mkdir, vec![rule(vec![bits(1, S_ISUID)?])?]);
    eperm.insert(libc::SYS_mkdirat, vec![rule(vec![bits(2, S_ISUID)?])?]);
    for nr in [libc::SYS_setxattr, libc::SYS_lsetxattr, libc::SYS_fsetxattr] {
        eperm.insert(nr, vec![]);
    }
    let mut nosys: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    nosys.insert(libc::SYS_openat2, vec![]);
    let build = |rules, errno: i32| -> Result<BpfProgram, FsGuardError> {
        let f = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno as u32), TargetArch::x86_64)
            .map_err(FsGuardError::Build)?;
        BpfProgram::try_from(f).map_err(FsGuardError::Build)
    };
    Ok([build(nosys, libc::ENOSYS)?, build(eperm, libc::EPERM)?])
}

/// Installs the filter on the calling thread (and what it execs).
pub fn install() -> Result<(), FsGuardError> {
    for p in programs()? {
        seccompiler::apply_filter(&p).map_err(FsGuardError::Install)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};

    fn errno(r: std::io::Result<()>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    #[test]
    fn set_id_bits_and_devices_are_refused_the_rest_works() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = d.path().to_path_buf();
        // In a thread of its own: a seccomp filter cannot be taken off again.
        let got = std::thread::spawn(move || {
            install().expect("install");
            let f = dir.join("f");
            let chmod = |mode| std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode));
            let create = |name: &str, mode| std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(dir.join(name)).map(drop);
            let mkdir = |name: &str, mode| std::fs::DirBuilder::new().mode(mode).create(dir.join(name));
            let mknod = |name: &str, kind, mode| {
                nix::sys::stat::mknod(&dir.join(name), kind, nix::sys::stat::Mode::from_bits_truncate(mode), nix::sys::stat::makedev(1, 3))
                    .map_err(std::io::Error::from)
            };
            // openat2 answers ENOSYS, so callers fall back to openat.
            let openat2 = || {
                rustix::fs::openat2(rustix::fs::CWD, &dir, rustix::fs::OFlags::RDONLY, rustix::fs::Mode::empty(), rustix::fs::ResolveFlags::empty())
                    .err()
                    .map(|e| e.raw_os_error())
            };
            vec![
                errno(std::fs::write(&f, b"x")),
                errno(chmod(0o755)),
                errno(chmod(0o4755)),
                errno(chmod(0o2755)),
                errno(create("plain", 0o644)),
                errno(create("suid", 0o4755)),
                errno(create("sgid", 0o2755)),
                errno(mkdir("sgid-dir", 0o2775)),
                errno(mkdir("suid-dir", 0o4775)),
                errno(mknod("null", nix::sys::stat::SFlag::S_IFCHR, 0o666)),
                errno(mknod("fifo", nix::sys::stat::SFlag::S_IFIFO, 0o644)),
                errno(mknod("suid-file", nix::sys::stat::SFlag::S_IFREG, 0o4755)),
                openat2(),
            ]
        })
        .join()
        .expect("thread");
        let eperm = Some(libc::EPERM);
        assert_eq!(
            got,
            vec![None, None, eperm, eperm, None, eperm, eperm, None, eperm, eperm, None, eperm, Some(libc::ENOSYS)],
            "write, chmod 755, chmod 4755, chmod 2755, create 644, create 4755, create 2755, mkdir 2775, mkdir 4775, mknod chr, mknod fifo, mknod 4755, openat2"
        );
        let mode = std::fs::metadata(d.path().join("f")).expect("f").permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);
        assert!(!d.path().join("suid").exists() && !d.path().join("null").exists());
    }
}
