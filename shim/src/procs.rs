//! Host processes of a sandbox recorded in its state dir, so that whoever finds the
//! dir after its owner died (`containerd-shim-moat-v2 delete`, the next sandbox's
//! stale sweep) can stop them.
//!
//! A pid alone is not an identity: after the process exits the number is reused. Each
//! record carries the process's start time (field 22 of `/proc/<pid>/stat`, clock
//! ticks since boot), and a pid is only signalled while that still matches.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The record file inside a state dir: one `<name> <pid> <start time>` line per process.
pub const PROCS_FILE: &str = "procs";

/// One recorded process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcRecord {
    pub name: String,
    pub pid: i32,
    pub start_time: u64,
}

/// The start time of `pid` (clock ticks after boot), None if there is no such process.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `/proc/<pid>/stat` line. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted from its last `)`.
pub(crate) fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is index 0, so field 22 is index 19.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Is `pid` still the recorded process, alive (not a zombie)?
fn is_live(rec: &ProcRecord) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", rec.pid)) else { return false };
    let zombie = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()).is_some_and(|s| s == "Z" || s == "X");
    !zombie && parse_start_time(&stat) == Some(rec.start_time)
}

/// Appends a record for `pid` to `dir/procs` (synced: a SIGKILL right after must not
/// lose it).
pub fn record(dir: &Path, name: &str, pid: u32) -> std::io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| std::io::Error::other(format!("pid {pid} out of range")))?;
    let start = start_time(pid).ok_or_else(|| std::io::Error::other(format!("{name} (pid {pid}) is already gone")))?;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(PROCS_FILE))?;
    f.write_all(format!("{name} {pid} {start}\n").as_bytes())?;
    f.sync_data()
}

/// The records of `dir`; malformed lines are skipped.
pub fn read(dir: &Path) -> Vec<ProcRecord> {
    let Ok(text) = std::fs::read_to_string(dir.join(PROCS_FILE)) else { return Vec::new() };
    text.lines()
        .filter_map(|l| {
            let mut it = l.split(' ');
            let (name, pid, start) = (it.next()?, it.next()?.parse().ok()?, it.next()?.parse().ok()?);
            (pid > 1).then(|| ProcRecord { name: name.to_string(), pid, start_time: start })
        })
        .collect()
}

/// SIGKILLs every recorded process that is still the one recorded and waits (up to
/// `timeout` in all) until each is gone. Returns the records that survived.
pub fn kill_recorded(dir: &Path, timeout: Duration) -> Vec<ProcRecord> {
    let recs = read(dir);
    for r in recs.iter().filter(|r| is_live(r)) {
        log::info!("{}: stopping leftover {} (pid {})", dir.display(), r.name, r.pid);
        let _ = kill(Pid::from_raw(r.pid), Signal::SIGKILL);
    }
    let end = Instant::now() + timeout;
    loop {
        let left: Vec<ProcRecord> = recs.iter().filter(|r| is_live(r)).cloned().collect();
        if left.is_empty() || Instant::now() >= end {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_command_names() {
        let line = "42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(line), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
        assert_eq!(parse_start_time("1 (x) S 1"), None);
    }

    #[test]
    fn records_round_trip_and_kill_spares_strangers() {
        let d = tempfile::tempdir().expect("tmp");
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("sleep");
        record(d.path(), "sleeper", child.id()).expect("record");
        // A record whose start time does not match (a reused pid) is left alone.
        let me = std::process::id();
        std::fs::OpenOptions::new()
            .append(true)
            .open(d.path().join(PROCS_FILE))
            .and_then(|mut f| f.write_all(format!("me {me} 1\nbad line\n").as_bytes()))
            .expect("append");
        let recs = read(d.path());
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].name, "sleeper");
        let left = kill_recorded(d.path(), Duration::from_secs(5));
        // The child is a zombie until we reap it: that counts as gone.
        assert!(left.is_empty(), "{left:?}");
        let status = child.wait().expect("wait");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
        assert!(start_time(me as i32).is_some(), "we are still alive");
    }
}
