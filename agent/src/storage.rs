//! Storages: filesystems a CreateContainerRequest asks the agent to mount in the
//! guest (the pod's virtio-fs share, a block device) before it builds the container.
//! They are shared by target between the containers of a pod and unmounted when the
//! last container using them is removed.

use std::collections::HashMap;
use std::path::{Component, Path};
use std::sync::{Mutex, OnceLock};

use moat_protocol::Storage;
use nix::mount::{mount, umount2, MntFlags};

use crate::error::{AgentError, Result};

struct Mounted {
    users: usize,
    source: String,
    fstype: String,
}

fn table() -> &'static Mutex<HashMap<String, Mounted>> {
    static T: OnceLock<Mutex<HashMap<String, Mounted>>> = OnceLock::new();
    T.get_or_init(Default::default)
}

fn invalid(msg: String) -> AgentError {
    AgentError::InvalidArgument(msg)
}

/// Checks a storage request without touching anything.
pub fn validate(s: &Storage) -> Result<()> {
    let t = Path::new(&s.target);
    if !t.is_absolute() || t.components().any(|c| matches!(c, Component::ParentDir)) || t == Path::new("/") {
        return Err(invalid(format!("storage target {:?} must be an absolute path below /, without `..`", s.target)));
    }
    for sys in ["/proc", "/sys", "/dev"] {
        if t.starts_with(sys) {
            return Err(invalid(format!("storage target {:?} is inside the guest's {sys}", s.target)));
        }
    }
    if s.source.is_empty() || s.fstype.is_empty() {
        return Err(invalid(format!("storage for {:?} needs a source and a fstype", s.target)));
    }
    Ok(())
}

/// Mounts `s` unless an earlier container did; counts one more user.
pub fn acquire(s: &Storage) -> Result<()> {
    validate(s)?;
    let mut t = table().lock().map_err(|_| AgentError::Internal("storage table poisoned".into()))?;
    if let Some(m) = t.get_mut(&s.target) {
        if m.source != s.source || m.fstype != s.fstype {
            return Err(invalid(format!(
                "storage target {} already holds {} ({}), not {} ({})",
                s.target, m.source, m.fstype, s.source, s.fstype
            )));
        }
        m.users += 1;
        return Ok(());
    }
    std::fs::create_dir_all(&s.target).map_err(|e| AgentError::internal(format!("cannot create {}", s.target), e))?;
    if s.fstype == "overlay" {
        prepare_overlay(&s.options)?;
    }
    let o = crate::mounts::parse_options(&s.options);
    let data = o.data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    mount(Some(s.source.as_str()), s.target.as_str(), Some(s.fstype.as_str()), o.flags, data).map_err(|e| {
        let msg = format!("cannot mount storage {} ({}) on {}", s.source, s.fstype, s.target);
        if e == nix::Error::ENOENT || e == nix::Error::ENODEV || e == nix::Error::EINVAL {
            invalid(format!("{msg}: {e}"))
        } else {
            AgentError::internal(msg, e)
        }
    })?;
    log::info!("storage {} ({}) mounted on {}", s.source, s.fstype, s.target);
    t.insert(s.target.clone(), Mounted { users: 1, source: s.source.clone(), fstype: s.fstype.clone() });
    Ok(())
}

/// Creates an overlay's upper and work directories (on a storage mounted before it),
/// the upper one with the mode and owner of the first lower layer's root, which is
/// what the merged root shows.
fn prepare_overlay(options: &[String]) -> Result<()> {
    let opt = |key: &str| options.iter().find_map(|o| o.strip_prefix(key).and_then(|v| v.strip_prefix('=')));
    let (Some(upper), Some(work)) = (opt("upperdir"), opt("workdir")) else { return Ok(()) };
    for d in [upper, work] {
        std::fs::create_dir_all(d).map_err(|e| AgentError::internal(format!("cannot create {d}"), e))?;
    }
    if let Some(lower) = opt("lowerdir").and_then(|l| l.split(':').next()) {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let m = std::fs::metadata(lower).map_err(|e| AgentError::internal(format!("cannot stat the lower layer {lower}"), e))?;
        std::fs::set_permissions(upper, std::fs::Permissions::from_mode(m.mode() & 0o7777))
            .map_err(|e| AgentError::internal(format!("cannot set the mode of {upper}"), e))?;
        std::os::unix::fs::chown(upper, Some(m.uid()), Some(m.gid())).map_err(|e| AgentError::internal(format!("cannot chown {upper}"), e))?;
    }
    Ok(())
}

/// One user fewer; unmounts when none is left.
pub fn release(target: &str) {
    let Ok(mut t) = table().lock() else { return };
    let Some(m) = t.get_mut(target) else { return };
    m.users -= 1;
    if m.users > 0 {
        return;
    }
    t.remove(target);
    match umount2(target, MntFlags::empty()) {
        Ok(()) => log::info!("storage on {target} unmounted"),
        Err(e) => {
            log::warn!("storage on {target}: unmount failed ({e}); detaching it");
            let _ = umount2(target, MntFlags::MNT_DETACH);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(target: &str) -> Storage {
        Storage { source: "/dev/vda".into(), fstype: "ext4".into(), target: target.into(), ..Default::default() }
    }

    #[test]
    fn storage_targets_are_checked() {
        assert!(validate(&s("/run/moat/disk")).is_ok());
        for bad in ["relative", "/", "/run/../etc", "/proc/x", "/dev/vdb"] {
            assert!(matches!(validate(&s(bad)), Err(AgentError::InvalidArgument(_))), "{bad}");
        }
        let mut no_type = s("/x");
        no_type.fstype.clear();
        assert!(validate(&no_type).is_err());
    }
}
