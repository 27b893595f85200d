//! containerd-shim-moat-v2: containerd's runtime `io.containerd.moat.v2`.
//!
//! containerd runs this binary three ways (runtime v2 shim protocol, task API v2):
//! - `start`: find or spawn the shim serving the container's pod and print its
//!   ttrpc address. Containers with the same `io.kubernetes.cri.sandbox-id` share
//!   one shim (and one VM); any other container gets its own.
//! - (no action, `-socket ADDR`): the long-lived shim serving the Task API
//!   ([`service`]).
//! - `delete`: clean up after a shim that died: stop the pod's VMM and fs backend by
//!   their recorded pids and remove its state dir.
//!
//! This file and [`service`] are the only code of moat that knows containerd's types.
#![forbid(unsafe_code)]

mod service;

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{util, Config, DeleteResponse, ExitSignal, Flags, StartOpts};
use moat_config::MoatConfig;
use moat_shim::{oci, procs, sandbox};
use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// The runtime's name as containerd knows it.
const RUNTIME_ID: &str = "io.containerd.moat.v2";
/// Exit status reported for a task whose shim died (as if SIGKILLed).
const EXIT_SHIM_DIED: u32 = 137;

struct Shim {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
    bundle: String,
}

/// The pod of the container whose bundle is `bundle` ("" = the working directory,
/// where containerd starts us).
fn pod_of(bundle: &str, container_id: &str) -> String {
    let bundle = if bundle.is_empty() { Path::new(".") } else { Path::new(bundle) };
    match oci::read_bundle_spec(bundle) {
        Ok(spec) => oci::pod_id(&spec, container_id),
        Err(e) => {
            log::warn!("{container_id}: {e}; taking the container id as its pod");
            container_id.to_string()
        }
    }
}

impl containerd_shim::Shim for Shim {
    type T = service::Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Shim { exit: Arc::new(ExitSignal::default()), id: args.id.clone(), namespace: args.namespace.clone(), bundle: args.bundle.clone() }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        let pod = pod_of("", &opts.id);
        // The socket address is derived from the pod: a shim already serving it
        // answers there, and the child spawned here sees that and exits at once.
        let (_pid, address) = containerd_shim::spawn(opts, &pod, Vec::new())?;
        util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        let pod = pod_of(&self.bundle, &self.id);
        let cfg = MoatConfig::load().map_err(|e| containerd_shim::Error::Other(e.to_string()))?;
        let dir = cfg.state_dir.join(&pod);
        let pid = procs::read(&dir).iter().find(|r| r.name == "moat-vmm").map_or(0, |r| r.pid as u32);
        // Only a dir whose lock nobody holds is dead. One without a lock file may be a
        // sandbox being created this instant (containerd runs this after every shim
        // exit, also when the next container of the same name is starting): the
        // stale sweep of the next start removes such dirs once they are old.
        if let Some(_lock) = sandbox::lock_if_dead(&dir) {
            log::info!("{}: shim gone; cleaning up pod {pod}", self.id);
            sandbox::remove_dead(&dir).map_err(|e| containerd_shim::Error::Other(e.to_string()))?;
        }
        Ok(DeleteResponse { pid, exit_status: EXIT_SHIM_DIED, exited_at: Some(SystemTime::now().into()).into(), ..Default::default() })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        service::Service::new(self.exit.clone(), publisher, &self.namespace)
    }
}

/// The serving shim's own mount namespace, a slave of the host's: container roots
/// it mounts never show on the host, and vanish with the last process in it.
/// unshare(CLONE_NEWNS) only moves the calling thread, so this must run before any
/// other thread exists.
fn private_mount_namespace() -> nix::Result<()> {
    unshare(CloneFlags::CLONE_NEWNS)?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
}

fn main() {
    moat_shim::helper::run_if_helper();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Ok(flags) = containerd_shim::parse(&args[1..]) {
        // `-v` as containerd's own shims answer it (the crate does not): `moat doctor`
        // checks that the shim on PATH comes from the same release as `moat`.
        if flags.version {
            println!("{}:\n  Version: {}\n  Runtime: {RUNTIME_ID}", env!("CARGO_BIN_NAME"), env!("CARGO_PKG_VERSION"));
            std::process::exit(0);
        }
        if flags.action.is_empty() && !flags.socket.is_empty() {
            if let Err(e) = private_mount_namespace() {
                eprintln!("{RUNTIME_ID}: cannot make a mount namespace for the shim: {e}");
                std::process::exit(1);
            }
        }
    }
    // Our children (VMM, fs backend) are waited for by their owners; the crate's
    // reaper would steal their exit statuses.
    let config = Config { no_reaper: true, no_sub_reaper: true, ..Default::default() };
    containerd_shim::run::<Shim>(RUNTIME_ID, Some(config));
}
