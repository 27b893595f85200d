//! `moat-vmm`: runs one microVM described by a `VmConfig` (a JSON file, flags, or both:
//! flags override the file).
//!
//! Exit status: 0 the guest powered off cleanly; 1 the VMM failed (KVM, devices);
//! 2 the configuration or command line is invalid; 3 the guest reset or crashed
//! without powering off; 4 the guest powered off reporting a failure (the agent's
//! status is logged); 128+N stopped by signal N (SIGTERM: 143).

use std::path::PathBuf;
use std::process::ExitCode;

use moat_config::{check_memory, check_vcpus, DiskConfig, FsConfig, SerialOutput, VmConfig, VsockConfig};
use moat_vmm::{Microvm, Outcome, StopReason};

const USAGE: &str = "usage: moat-vmm [--config FILE] [--kernel PATH] [--initrd PATH] [--vcpus N] \
[--memory MIB] [--cmdline STRING] [--serial stdout|none|PATH] [--disk PATH[,ro]]... [--fs TAG=SOCKET]... [--vsock UDS_PATH [--vsock-cid N]] [--no-seccomp] [--no-huge-pages] [--die-with-parent] | --print-default-cmdline";

#[derive(Debug)]
struct UsageError(String);

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<VmConfig>, UsageError> {
    let mut args = args.into_iter();
    let mut file: Option<PathBuf> = None;
    let mut flags: Vec<(String, String)> = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--no-seccomp" | "--no-huge-pages" => flags.push((arg, String::new())),
            "--print-default-cmdline" => {
                println!("{}", moat_config::DEFAULT_CMDLINE);
                std::process::exit(0);
            }
            "--config" | "--kernel" | "--initrd" | "--vcpus" | "--memory" | "--cmdline" | "--serial" | "--vsock"
            | "--vsock-cid" | "--disk" | "--fs" => {
                let value = args.next().ok_or_else(|| UsageError(format!("{arg} needs a value")))?;
                if arg == "--config" {
                    file = Some(value.into());
                } else {
                    flags.push((arg, value));
                }
            }
            other => return Err(UsageError(format!("unknown argument {other:?}"))),
        }
    }
    let mut config = match file {
        Some(path) => VmConfig::from_file(&path).map_err(|e| UsageError(error_chain(&e)))?,
        None => VmConfig::default(),
    };
    for (flag, value) in flags {
        let number = || value.parse::<u64>().map_err(|_| UsageError(format!("{flag} wants a number, got {value:?}")));
        match flag.as_str() {
            "--kernel" => config.kernel = value.into(),
            "--initrd" => config.initrd = Some(value.into()),
            "--vcpus" => config.vcpus = check_vcpus(number()?).map_err(|e| UsageError(e.to_string()))?,
            "--memory" => config.memory_mib = check_memory(number()?).map_err(|e| UsageError(e.to_string()))?,
            "--cmdline" => config.cmdline = value,
            "--no-seccomp" => config.seccomp = false,
            "--disk" => {
                let (path, read_only) = match value.strip_suffix(",ro") {
                    Some(p) => (p, true),
                    None => (value.as_str(), false),
                };
                config.disks.push(DiskConfig { path: path.into(), read_only });
            }
            "--fs" => {
                let Some((tag, socket)) = value.split_once('=') else {
                    return Err(UsageError(format!("--fs wants TAG=SOCKET, got {value:?}")));
                };
                config.fs.push(FsConfig { tag: tag.into(), socket: socket.into() });
            }
            "--vsock" => {
                let cid = config.vsock.as_ref().map_or(3, |v| v.cid);
                config.vsock = Some(VsockConfig { cid, uds_path: value.into() });
            }
            "--vsock-cid" => {
                let cid = number()?;
                match config.vsock.as_mut() {
                    Some(v) => v.cid = cid,
                    None => return Err(UsageError("--vsock-cid needs --vsock PATH before it".into())),
                }
            }
            "--no-huge-pages" => config.huge_pages = false,
            "--serial" => {
                config.serial = match value.as_str() {
                    "stdout" => SerialOutput::Stdout,
                    "none" => SerialOutput::None,
                    _ => SerialOutput::File(value.into()),
                }
            }
            _ => unreachable!("only known flags are collected"),
        }
    }
    if config.kernel.as_os_str().is_empty() {
        return Err(UsageError("no kernel given (--kernel or \"kernel\" in --config)".into()));
    }
    Ok(Some(config))
}

/// "a: b: c" from an error and its sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.ends_with(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}

fn exit_status(outcome: &Outcome) -> u8 {
    match &outcome.reason {
        StopReason::PowerOff(0) => 0,
        StopReason::PowerOff(_) => 4,
        StopReason::Reset | StopReason::TripleFault(_) | StopReason::Crashed(_) => 3,
        StopReason::Signal(n) => (128 + n).clamp(0, 255) as u8,
        StopReason::Error(_) => 1,
    }
}

fn main() -> ExitCode {
    moat_vmm::started();
    // Started by moat's jail helper, which stays as our parent outside our pid
    // namespace: go when it goes, whatever killed it.
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--die-with-parent") {
        args.remove(i);
        if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
            eprintln!("moat-vmm: cannot set the parent-death signal: {e}");
            return ExitCode::from(1);
        }
    }
    // virtio-queue logs at error level on driver mistakes a guest can repeat at will;
    // keep those out of the host's logs unless asked for with RUST_LOG.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info,virtio_queue=off"))
        .format_timestamp_millis()
        .init();
    let config = match parse_args(args) {
        Ok(Some(c)) => c,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(UsageError(msg)) => {
            eprintln!("moat-vmm: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let vm = match Microvm::try_from(config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("moat-vmm: {}", error_chain(&e));
            // A missing or dead fs backend is a configuration problem too.
            let code = match e {
                moat_vmm::BuildError::Config(_) | moat_vmm::BuildError::Boot(_) | moat_vmm::BuildError::Fs { .. } => 2,
                _ => 1,
            };
            return ExitCode::from(code);
        }
    };
    match vm.run() {
        Ok(outcome) => {
            match &outcome.reason {
                StopReason::PowerOff(0) => log::info!("guest powered off"),
                StopReason::PowerOff(s) => log::error!("guest powered off reporting failure status {s}"),
                StopReason::Reset => log::warn!("guest reset without powering off (reboot or panic)"),
                StopReason::TripleFault(id) => log::error!("guest crashed: triple fault on vcpu{id}"),
                StopReason::Crashed(why) => log::error!("guest crashed: {why}"),
                StopReason::Signal(n) => log::info!("stopped by signal {n}"),
                StopReason::Error(why) => log::error!("VM failed: {why}"),
            }
            log::info!(
                "ran {:.1} ms, {} VM exits to the VMM",
                outcome.ran_for.as_secs_f64() * 1000.0,
                outcome.exits
            );
            ExitCode::from(exit_status(&outcome))
        }
        Err(e) => {
            eprintln!("moat-vmm: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_build_a_config() {
        let c = parse_args(args(&["--kernel", "/k", "--vcpus", "2", "--memory", "1024", "--serial", "none"]))
            .expect("parse")
            .expect("config");
        assert_eq!((c.vcpus, c.memory_mib, c.serial), (2, 1024, SerialOutput::None));
        let c = parse_args(args(&["--kernel", "/k", "--disk", "/a.img", "--disk", "/b.img,ro"]))
            .expect("parse")
            .expect("config");
        assert_eq!(
            c.disks,
            vec![
                DiskConfig { path: "/a.img".into(), read_only: false },
                DiskConfig { path: "/b.img".into(), read_only: true }
            ]
        );
    }

    #[test]
    fn fs_flags() {
        let c = parse_args(args(&["--kernel", "/k", "--fs", "moatfs=/run/a.sock", "--fs", "b=/x=y"]))
            .expect("parse")
            .expect("config");
        assert_eq!(
            c.fs,
            vec![
                FsConfig { tag: "moatfs".into(), socket: "/run/a.sock".into() },
                FsConfig { tag: "b".into(), socket: "/x=y".into() }
            ]
        );
        let e = parse_args(args(&["--kernel", "/k", "--fs", "/run/a.sock"])).expect_err("no tag").0;
        assert_eq!(e, "--fs wants TAG=SOCKET, got \"/run/a.sock\"");
    }

    #[test]
    fn bad_flags_name_the_problem() {
        let e = |a: &[&str]| parse_args(args(a)).expect_err("must fail").0;
        assert_eq!(e(&["--kernel", "/k", "--vcpus", "0"]), "vcpus must be between 1 and 64, got 0");
        assert_eq!(e(&["--kernel", "/k", "--vcpus", "two"]), "--vcpus wants a number, got \"two\"");
        assert_eq!(e(&["--kernel", "/k", "--memory", "8"]), "memory_mib must be between 32 and 262144 MiB, got 8");
        assert_eq!(e(&["--vcpus"]), "--vcpus needs a value");
        assert_eq!(e(&["--frob"]), "unknown argument \"--frob\"");
        assert!(e(&[]).starts_with("no kernel given"));
        assert!(e(&["--config", "/nonexistent.json"]).starts_with("cannot read config file /nonexistent.json: "));
    }

    #[test]
    fn exit_statuses() {
        let o = |reason| Outcome { reason, boot: None, exits: 0, ran_for: std::time::Duration::ZERO };
        assert_eq!(exit_status(&o(StopReason::PowerOff(0))), 0);
        assert_eq!(exit_status(&o(StopReason::PowerOff(9))), 4);
        assert_eq!(exit_status(&o(StopReason::Reset)), 3);
        assert_eq!(exit_status(&o(StopReason::TripleFault(1))), 3);
        assert_eq!(exit_status(&o(StopReason::Signal(15))), 143);
        assert_eq!(exit_status(&o(StopReason::Error("x".into()))), 1);
    }
}
