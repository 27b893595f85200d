//! cgroup v2: one cgroup per container under /sys/fs/cgroup/moat/<id>, its limits
//! (OCI `linux.resources` translated to cgroup v2 files), its figures (Stats), and
//! freezing and killing everything in it. The agent itself stays in the root cgroup,
//! so the no-internal-process rule never bites: /moat holds no process, only children.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{AgentError, Result};
use crate::spec::Resources;

pub const ROOT: &str = "/sys/fs/cgroup";
const PARENT: &str = "moat";
const CONTROLLERS: &[&str] = &["cpu", "io", "memory", "pids", "cpuset"];

fn internal(what: String, e: std::io::Error) -> AgentError {
    AgentError::internal(what, e)
}

/// Enables the controllers for containers: in the root's and in /moat's
/// subtree_control. Controllers the kernel lacks are skipped.
pub fn setup() -> Result<()> {
    let parent = Path::new(ROOT).join(PARENT);
    fs::create_dir_all(&parent).map_err(|e| internal(format!("cannot create {}", parent.display()), e))?;
    for dir in [Path::new(ROOT), parent.as_path()] {
        let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        for c in CONTROLLERS.iter().filter(|c| available.split_whitespace().any(|a| a == **c)) {
            let file = dir.join("cgroup.subtree_control");
            if let Err(e) = fs::write(&file, format!("+{c}")) {
                log::warn!("cannot enable the {c} controller in {}: {e}", file.display());
            }
        }
    }
    Ok(())
}

/// cpu.weight from OCI cpu.shares (2..262144 onto 1..10000, as runc and crun map them).
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// io.weight from OCI blkio weight (10..1000 onto 1..10000).
pub fn blkio_to_io_weight(weight: u16) -> u64 {
    let w = u64::from(weight.clamp(10, 1000));
    1 + ((w - 10) * 9999) / 990
}

fn limit(v: i64) -> String {
    if v < 0 {
        "max".into()
    } else {
        v.to_string()
    }
}

/// The (file, value) writes that apply `r`, in order. Pure, for validation and tests.
pub fn resource_writes(r: &Resources) -> Result<Vec<(String, String)>> {
    let mut w: Vec<(String, String)> = Vec::new();
    let mut put = |f: &str, v: String| w.push((f.to_string(), v));
    if let Some(m) = &r.memory {
        if let Some(l) = m.limit {
            put("memory.max", limit(l));
        }
        if let Some(res) = m.reservation {
            put("memory.low", limit(res));
        }
        if let Some(swap) = m.swap {
            // OCI swap is memory + swap; cgroup v2 counts swap alone.
            let v = match (swap, m.limit) {
                (s, _) if s < 0 => "max".to_string(),
                (s, Some(l)) if l >= 0 => {
                    if s < l {
                        return Err(AgentError::InvalidArgument(format!(
                            "linux.resources.memory.swap {s} is below memory.limit {l} (OCI swap counts memory too)"
                        )));
                    }
                    (s - l).to_string()
                }
                (0, _) => "0".to_string(),
                (s, _) => {
                    return Err(AgentError::InvalidArgument(format!(
                        "linux.resources.memory.swap {s} needs memory.limit to be set"
                    )))
                }
            };
            put("memory.swap.max", v);
        }
    }
    if let Some(c) = &r.cpu {
        if let Some(s) = c.shares {
            put("cpu.weight", shares_to_weight(s).to_string());
        }
        match (c.quota, c.period) {
            (Some(q), p) => {
                let p = p.unwrap_or(100_000);
                put("cpu.max", format!("{} {p}", limit(if q == 0 { -1 } else { q })));
            }
            (None, Some(p)) => put("cpu.max", format!("max {p}")),
            (None, None) => {}
        }
        if let Some(b) = c.burst {
            put("cpu.max.burst", b.to_string());
        }
        if let Some(i) = c.idle {
            put("cpu.idle", i.to_string());
        }
        if let Some(cpus) = c.cpus.as_ref().filter(|s| !s.is_empty()) {
            put("cpuset.cpus", cpus.clone());
        }
        if let Some(mems) = c.mems.as_ref().filter(|s| !s.is_empty()) {
            put("cpuset.mems", mems.clone());
        }
    }
    if let Some(p) = &r.pids {
        put("pids.max", if p.limit <= 0 { "max".into() } else { p.limit.to_string() });
    }
    if let Some(b) = &r.block_io {
        if let Some(weight) = b.weight {
            put("io.weight", format!("default {}", blkio_to_io_weight(weight)));
        }
        for d in &b.weight_device {
            if let Some(weight) = d.weight {
                put("io.weight", format!("{}:{} {}", d.major, d.minor, blkio_to_io_weight(weight)));
            }
        }
        for (key, list) in [
            ("rbps", &b.throttle_read_bps_device),
            ("wbps", &b.throttle_write_bps_device),
            ("riops", &b.throttle_read_iops_device),
            ("wiops", &b.throttle_write_iops_device),
        ] {
            for d in list {
                let rate = if d.rate == 0 { "max".to_string() } else { d.rate.to_string() };
                put("io.max", format!("{}:{} {key}={rate}", d.major, d.minor));
            }
        }
    }
    for (k, v) in &r.unified {
        put(k, v.clone());
    }
    Ok(w)
}

/// One container's cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    pub path: PathBuf,
}

/// Parses a flat keyed file (`key value` per line) such as cpu.stat.
pub fn parse_flat(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (k, v) = (it.next()?, it.next()?);
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// A single-value file: a number, or "max" (= 0, no limit).
pub fn parse_single(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct IoLine {
    pub major: u32,
    pub minor: u32,
    pub rbytes: u64,
    pub wbytes: u64,
    pub rios: u64,
    pub wios: u64,
}

/// Parses io.stat: `MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. ...` per line.
pub fn parse_io_stat(text: &str) -> Vec<IoLine> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let Some((maj, min)) = it.next().and_then(|d| d.split_once(':')) else { continue };
        let (Ok(major), Ok(minor)) = (maj.parse(), min.parse()) else { continue };
        let mut l = IoLine { major, minor, ..Default::default() };
        for kv in it {
            let Some((k, v)) = kv.split_once('=') else { continue };
            let v = v.parse().unwrap_or(0);
            match k {
                "rbytes" => l.rbytes = v,
                "wbytes" => l.wbytes = v,
                "rios" => l.rios = v,
                "wios" => l.wios = v,
                _ => {}
            }
        }
        out.push(l);
    }
    out
}

impl Cgroup {
    pub fn for_container(id: &str) -> Cgroup {
        Cgroup { path: Path::new(ROOT).join(PARENT).join(id) }
    }

    pub fn create(&self) -> Result<()> {
        match fs::create_dir(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Left by a container of the same id that was not removed cleanly.
                if self.procs()?.is_empty() {
                    Ok(())
                } else {
                    Err(AgentError::AlreadyExists(format!("cgroup {} is in use", self.path.display())))
                }
            }
            Err(e) => Err(internal(format!("cannot create cgroup {}", self.path.display()), e)),
        }
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        let p = self.path.join(file);
        fs::write(&p, value).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                AgentError::InvalidArgument(format!("cgroup file {file} does not exist (controller not available)"))
            } else if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::ERANGE) {
                AgentError::InvalidArgument(format!("cgroup {file} refused value {value:?}"))
            } else {
                internal(format!("cannot write {value:?} to {}", p.display()), e)
            }
        })
    }

    fn read(&self, file: &str) -> Result<String> {
        let p = self.path.join(file);
        fs::read_to_string(&p).map_err(|e| internal(format!("cannot read {}", p.display()), e))
    }

    /// Applies OCI resources.
    pub fn apply(&self, r: &Resources) -> Result<()> {
        for (file, value) in resource_writes(r)? {
            self.write(&file, &value)?;
        }
        Ok(())
    }

    pub fn procs(&self) -> Result<Vec<u32>> {
        Ok(self.read("cgroup.procs")?.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// SIGKILLs everything in the cgroup at once.
    pub fn kill(&self) -> Result<()> {
        self.write("cgroup.kill", "1")
    }

    /// Freezes or thaws the cgroup and waits until the kernel says it is done.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        self.write("cgroup.freeze", if frozen { "1" } else { "0" })?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        let start = Instant::now();
        loop {
            if self.read("cgroup.events")?.lines().any(|l| l.trim() == want) {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(AgentError::Internal(format!("{} did not reach `{want}` in 10 s", self.path.display())));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stats(&self) -> Result<moat_protocol::StatsResponse> {
        let opt = |f: &str| fs::read_to_string(self.path.join(f)).unwrap_or_default();
        let io = parse_io_stat(&opt("io.stat"))
            .into_iter()
            .map(|l| moat_protocol::IoStat {
                major: l.major,
                minor: l.minor,
                rbytes: l.rbytes,
                wbytes: l.wbytes,
                rios: l.rios,
                wios: l.wios,
                ..Default::default()
            })
            .collect();
        Ok(moat_protocol::StatsResponse {
            cpu_stat: parse_flat(&self.read("cpu.stat")?),
            memory_stat: parse_flat(&opt("memory.stat")),
            memory_current: parse_single(&opt("memory.current")),
            memory_max: parse_single(&opt("memory.max")),
            memory_peak: parse_single(&opt("memory.peak")),
            swap_current: parse_single(&opt("memory.swap.current")),
            pids_current: parse_single(&opt("pids.current")),
            pids_max: parse_single(&opt("pids.max")),
            io,
            ..Default::default()
        })
    }

    /// Removes the cgroup once it is empty, waiting up to `timeout` for dying
    /// processes to leave it.
    pub fn remove(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) if start.elapsed() > timeout => {
                    return Err(internal(format!("cannot remove cgroup {}", self.path.display()), e))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Cpu, Memory, Pids};

    #[test]
    fn shares_map_onto_weights() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(0), 100);
        assert_eq!(blkio_to_io_weight(10), 1);
        assert_eq!(blkio_to_io_weight(1000), 10_000);
    }

    #[test]
    fn resources_become_cgroup_writes() {
        let r = Resources {
            memory: Some(Memory { limit: Some(64 << 20), swap: Some(96 << 20), ..Default::default() }),
            cpu: Some(Cpu { shares: Some(1024), quota: Some(50_000), period: Some(100_000), ..Default::default() }),
            pids: Some(Pids { limit: 32 }),
            ..Default::default()
        };
        let w = resource_writes(&r).expect("valid");
        let get = |f: &str| w.iter().find(|(k, _)| k == f).map(|(_, v)| v.as_str());
        assert_eq!(get("memory.max"), Some("67108864"));
        assert_eq!(get("memory.swap.max"), Some("33554432"));
        assert_eq!(get("cpu.weight"), Some("39"));
        assert_eq!(get("cpu.max"), Some("50000 100000"));
        assert_eq!(get("pids.max"), Some("32"));
    }

    #[test]
    fn unlimited_values_are_max() {
        let r = Resources {
            memory: Some(Memory { limit: Some(-1), swap: Some(-1), ..Default::default() }),
            cpu: Some(Cpu { quota: Some(-1), ..Default::default() }),
            pids: Some(Pids { limit: 0 }),
            ..Default::default()
        };
        let w = resource_writes(&r).expect("valid");
        assert!(w.contains(&("memory.max".into(), "max".into())));
        assert!(w.contains(&("memory.swap.max".into(), "max".into())));
        assert!(w.contains(&("cpu.max".into(), "max 100000".into())));
        assert!(w.contains(&("pids.max".into(), "max".into())));
    }

    #[test]
    fn swap_below_limit_is_refused() {
        let r = Resources {
            memory: Some(Memory { limit: Some(100), swap: Some(50), ..Default::default() }),
            ..Default::default()
        };
        assert!(matches!(resource_writes(&r), Err(AgentError::InvalidArgument(m)) if m.contains("swap")));
    }

    #[test]
    fn stat_files_parse() {
        let m = parse_flat("usage_usec 1234\nuser_usec 1000\nsystem_usec 234\nnr_periods 0\n");
        assert_eq!(m.get("usage_usec"), Some(&1234));
        assert_eq!(parse_single("max\n"), 0);
        assert_eq!(parse_single("4096\n"), 4096);
        let io = parse_io_stat("254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\nbad line\n");
        assert_eq!(io, vec![IoLine { major: 254, minor: 0, rbytes: 4096, wbytes: 8192, rios: 1, wios: 2 }]);
    }
}
