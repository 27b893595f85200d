//! Guest bring-up: the filesystems every moat guest has, the kernel command line, and
//! power-off.

use std::fs;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::stat::Mode;
use nix::unistd::sync;

use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot create {0}")]
    Mkdir(&'static str, #[source] std::io::Error),
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot read /proc/cmdline")]
    Cmdline(#[source] std::io::Error),
}

/// What the agent reads from the kernel command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AgentCmdline {
    /// `moat.poweroff`: power off once ready.
    pub power_off: bool,
    /// `moat.selftest`: exercise the devices and report before the ready line.
    pub self_test: bool,
}

impl AgentCmdline {
    pub fn parse(cmdline: &str) -> AgentCmdline {
        let mut c = AgentCmdline::default();
        for word in cmdline.split_ascii_whitespace() {
            match word {
                "moat.poweroff" => c.power_off = true,
                "moat.selftest" => c.self_test = true,
                _ => {}
            }
        }
        c
    }
}

/// The mounts every guest gets, in order: (source, target, fstype, flags, data).
const MOUNTS: &[(&str, &str, &str, u64, &str)] = &[
    ("proc", "/proc", "proc", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, ""),
    ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", libc::MS_NOSUID | libc::MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"),
    ("tmpfs", "/dev/shm", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=0755"),
    ("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777"),
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, "nsdelegate"),
];

/// Moves the agent's root from the initramfs onto a tmpfs mounted over it (what
/// switch_root does). The initramfs is the namespace's root mount and pivot_root(2)
/// refuses to pivot away from it; a root mount with a parent lets every container
/// pivot_root into its rootfs and detach the guest's tree. The agent binary stays
/// reachable through /proc/self/exe, which is all the container helper needs.
fn leave_initramfs() -> nix::Result<()> {
    let new_root = "/.moat-root";
    fs::create_dir_all(new_root).map_err(|_| nix::Error::EIO)?;
    mount(Some("tmpfs"), new_root, Some("tmpfs"), MsFlags::empty(), Some("mode=0755"))?;
    nix::unistd::chdir(new_root)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
    nix::unistd::chroot(".")?;
    nix::unistd::chdir("/")
}

/// Mounts the basic filesystems and reads the command line.
pub fn setup() -> Result<AgentCmdline, InitError> {
    if let Err(e) = leave_initramfs() {
        // Containers then fall back to move-and-chroot (see mounts.rs).
        println!("moat-agent: cannot move the root off the initramfs: {e}");
    }
    for &(source, target, fstype, flags, data) in MOUNTS {
        fs::create_dir_all(target).map_err(|e| InitError::Mkdir(target, e))?;
        let data = (!data.is_empty()).then_some(data);
        match mount(Some(source), target, Some(fstype), MsFlags::from_bits_truncate(flags), data) {
            Ok(()) => {}
            // devtmpfs may already be mounted by the kernel (DEVTMPFS_MOUNT).
            Err(nix::Error::EBUSY) if fstype == "devtmpfs" => {}
            Err(source) => return Err(InitError::Mount { fstype, target, source }),
        }
    }
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
    let text = fs::read_to_string("/proc/cmdline").map_err(InitError::Cmdline)?;
    Ok(AgentCmdline::parse(&text))
}

/// Seconds since the guest kernel started.
pub fn uptime() -> Option<f64> {
    let text = fs::read_to_string(Path::new("/proc/uptime")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// CPUs the guest kernel brought online.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
}

/// MemTotal from /proc/meminfo, in MiB (0 if unreadable).
pub fn mem_total_mib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib / 1024)
}

/// The hardware RNG the guest kernel uses ("virtio_rng.0" under moat), or "none".
pub fn hwrng() -> String {
    fs::read_to_string("/sys/class/misc/hw_random/rng_current")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "none".into())
}

/// Reads a few bytes from /dev/hwrng, giving up after `timeout`: proves the
/// virtio-rng data path end to end without ever blocking the agent.
pub fn hwrng_selftest(timeout: std::time::Duration) -> Result<usize, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 32];
        let r = fs::File::open("/dev/hwrng").and_then(|mut f| f.read_exact(&mut buf)).map(|_| buf.len());
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    rx.recv_timeout(timeout).map_err(|_| "timed out".to_string())?
}

/// Syncs, waits for the console to finish sending, tells the VMM the guest is done
/// with `status`, and powers off.
pub fn power_off(status: u8) -> ! {
    sync();
    // The VMM stops the VM at the power-off write, so everything printed must have
    // left the UART by then: the kernel sends console output asynchronously (on
    // another vCPU, from interrupts), and without this the last line was sometimes
    // cut short.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = nix::sys::termios::tcdrain(std::io::stdout());
    sys::report_power_off(status);
    // Without ACPI the kernel only halts here; the VMM has already stopped the VM on
    // the control-port write above. Under another VMM this still stops the guest.
    let _ = reboot(RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_flags() {
        assert_eq!(AgentCmdline::parse("console=ttyS0 quiet"), AgentCmdline::default());
        let c = AgentCmdline::parse("console=ttyS0 moat.poweroff\n");
        assert!(c.power_off && !c.self_test);
        let c = AgentCmdline::parse("moat.selftest moat.poweroff");
        assert!(c.power_off && c.self_test);
        assert_eq!(AgentCmdline::parse("moat.poweroffx"), AgentCmdline::default());
    }
}
