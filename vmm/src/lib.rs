//! moat-vmm: the minimal virtual machine monitor that runs one moat pod.
//!
//! A [`moat_config::VmConfig`] becomes a [`Microvm`] in one step
//! (`Microvm::try_from`); [`Microvm::run`] runs it until the guest powers off, resets,
//! fails, or the VMM is told to stop by a signal.

pub mod arch;
pub mod builder;
pub mod devices;
pub mod seccomp;
pub mod vstate;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

pub use builder::BuildError;
pub use devices::legacy::{BootTimes, SerialSink};
pub use devices::StopReason;
use devices::virtio::Readiness;
use devices::StopSink;

static STARTED: OnceLock<Instant> = OnceLock::new();

/// When this VMM process started (the first call fixes it; `main` calls it first).
pub fn started() -> Instant {
    *STARTED.get_or_init(Instant::now)
}

/// A virtio device on its transport, and the eventfds KVM signals when the driver
/// notifies one of its queues.
pub(crate) struct VirtioSlot {
    transport: Arc<Mutex<devices::virtio::mmio::MmioTransport>>,
    queue_evts: Vec<vmm_sys_util::eventfd::EventFd>,
}

/// A VM ready to run: memory loaded, devices wired, vCPUs configured.
pub struct Microvm {
    vm: vstate::vm::Vm,
    vcpus: Vec<vstate::vcpu::Vcpu>,
    ctx: vstate::vcpu::VcpuContext,
    virtio: Vec<VirtioSlot>,
    /// Confine the vCPU threads and the calling thread once running.
    seccomp: bool,
    serial: SerialSink,
    ready: Arc<Mutex<Option<BootTimes>>>,
    started: Instant,
}

/// How a VM run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub reason: StopReason,
    /// When the agent reported ready, if it did.
    pub boot: Option<BootTimes>,
    /// Exits to the VMM over the whole run.
    pub exits: u64,
    pub ran_for: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot set up signal handling")]
    Signals(#[source] nix::Error),
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
    #[error("waiting for the VM failed")]
    Poll(#[source] nix::Error),
    #[error("cannot confine the VMM")]
    Seccomp(#[from] seccomp::SeccompError),
}

/// A vCPU thread only loops over KVM_RUN and short device calls. A small stack also
/// keeps it from being backed by a 2 MiB transparent huge page, which the default
/// 2 MiB Rust stack was on hosts with THP "always" (measured: +2 MiB RSS per vCPU).
const VCPU_STACK_SIZE: usize = 256 * 1024;

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: being interrupted makes KVM_RUN return EINTR, and the vCPU loop
    // then sees that the VM is stopping.
}

impl Microvm {
    /// The guest's memory (tests read what a guest wrote).
    pub fn memory(&self) -> &vm_memory::GuestMemoryMmap {
        self.vm.memory()
    }

    /// Runs the VM until it stops. When this returns every vCPU thread has ended, or
    /// (stuck outside the guest past the stop deadline) ends with the process.
    pub fn run(self) -> Result<Outcome, RunError> {
        // Stop requests arrive as signals on a signalfd; block them first so every
        // thread spawned below inherits the mask and none is killed by them.
        let mut stop_signals = SigSet::empty();
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            stop_signals.add(s);
        }
        stop_signals.thread_block().map_err(RunError::Signals)?;
        let sfd =
            SignalFd::with_flags(&stop_signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).map_err(RunError::Signals)?;
        register_signal_handler(kick_signal(), on_kick).map_err(|e| RunError::Signals(nix::Error::from_raw(e.errno())))?;

        let filters = if self.seccomp {
            seccomp::install_violation_handler()?;
            Some((Arc::new(seccomp::vcpu_filter()?), seccomp::main_filter()?))
        } else {
            None
        };

        let running = Arc::new(AtomicBool::new(true));
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut spawn_error = None;
        for vcpu in self.vcpus {
            let running = running.clone();
            let name = format!("vcpu{}", vcpu.id());
            let filter = filters.as_ref().map(|f| f.0.clone());
            let body = move || {
                if let Some(f) = filter {
                    if let Err(e) = seccomp::install(&f) {
                        // Never run a guest unconfined when confinement was asked for.
                        vcpu.fail(format!("cannot confine vcpu thread: {e}"));
                        return;
                    }
                }
                // A panic is a VMM bug; it must still stop the VM rather than leave it
                // waiting for a vCPU that is gone (release builds abort instead).
                let sink = vcpu.sink();
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu.run(&running))).is_err() {
                    sink.stop(StopReason::Error("a vCPU thread panicked".into()));
                }
            };
            match std::thread::Builder::new().name(name).stack_size(VCPU_STACK_SIZE).spawn(body) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    spawn_error = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = spawn_error {
            stop_vcpus(&running, threads);
            return Err(RunError::Thread(e));
        }
        if let Some((_, main)) = &filters {
            if let Err(e) = seccomp::install(main) {
                stop_vcpus(&running, threads);
                return Err(e.into());
            }
        }

        let sink = self.ctx.sink.clone();
        let reason = loop {
            if let Some(r) = sink.reason() {
                break r;
            }
            match poll_devices(&self.virtio, &sink, &sfd) {
                Ok(()) => {}
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    stop_vcpus(&running, threads);
                    return Err(RunError::Poll(e));
                }
            }
        };
        stop_vcpus(&running, threads);
        self.serial.flush_all();
        let boot = *self.ready.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Outcome {
            reason,
            boot,
            exits: self.ctx.exits.load(Ordering::Relaxed),
            ran_for: self.started.elapsed(),
        })
    }
}

/// What one poll entry stands for.
enum Source {
    Stop,
    Signals,
    Queue(usize, usize),
    Backend(usize, RawFd),
}

/// One round of the main loop, which is also the device thread: waits for a stop
/// request, a signal, a virtio queue notification (ioeventfd), a device backend's
/// host socket or a device's own deadline, and serves what is ready under the
/// device's lock.
fn poll_devices(virtio: &[VirtioSlot], sink: &StopSink, sfd: &SignalFd) -> Result<(), nix::Error> {
    let mut sources = vec![Source::Stop, Source::Signals];
    let mut fds = vec![
        PollFd::new(event_fd_borrow(sink.event_fd()), PollFlags::POLLIN),
        PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
    ];
    let mut deadline: Option<Instant> = None;
    for (d, slot) in virtio.iter().enumerate() {
        for (q, evt) in slot.queue_evts.iter().enumerate() {
            sources.push(Source::Queue(d, q));
            fds.push(PollFd::new(event_fd_borrow(evt), PollFlags::POLLIN));
        }
        let (backend, due) = {
            let t = slot.transport.lock().unwrap_or_else(|p| p.into_inner());
            (t.backend_fds(), t.deadline())
        };
        deadline = match (deadline, due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // An fd that wants neither is still polled: poll always reports a hangup.
        for (fd, read, write) in backend {
            let mut flags = PollFlags::empty();
            flags.set(PollFlags::POLLIN, read);
            flags.set(PollFlags::POLLOUT, write);
            sources.push(Source::Backend(d, fd));
            // SAFETY: poll only hands the number to the kernel. The fd belongs to a
            // device of this VM; if a guest-triggered device reset on a vCPU thread
            // closes it meanwhile, poll reports POLLNVAL or the number's new owner,
            // and the device ignores readiness for fds it does not own.
            fds.push(PollFd::new(unsafe { BorrowedFd::borrow_raw(fd) }, flags));
        }
    }
    poll(&mut fds, poll_timeout(deadline, Instant::now()))?;
    let revents: Vec<PollFlags> = fds.iter().map(|f| f.revents().unwrap_or(PollFlags::empty())).collect();
    drop(fds);
    for (source, ev) in sources.iter().zip(revents) {
        if ev.is_empty() {
            continue;
        }
        match *source {
            Source::Stop => {
                let _ = sink.event_fd().read();
            }
            Source::Signals => {
                if let Ok(Some(info)) = sfd.read_signal() {
                    sink.stop(StopReason::Signal(info.ssi_signo as i32));
                }
            }
            Source::Queue(d, q) => {
                if virtio[d].queue_evts[q].read().is_ok() {
                    let more = virtio[d].transport.lock().unwrap_or_else(|p| p.into_inner()).notify(q);
                    if more {
                        // Come back to it after the other events (stop requests first).
                        let _ = virtio[d].queue_evts[q].write(1);
                    }
                }
            }
            Source::Backend(d, fd) => {
                let ready = Readiness {
                    readable: ev.contains(PollFlags::POLLIN),
                    writable: ev.contains(PollFlags::POLLOUT),
                    hangup: ev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR),
                };
                if !ev.contains(PollFlags::POLLNVAL) {
                    let more = virtio[d].transport.lock().unwrap_or_else(|p| p.into_inner()).backend_ready(fd, ready);
                    if more {
                        come_back(&virtio[d]);
                    }
                }
            }
        }
    }
    if deadline.is_some_and(|d| d <= Instant::now()) {
        let now = Instant::now();
        for slot in virtio {
            let more = {
                let mut t = slot.transport.lock().unwrap_or_else(|p| p.into_inner());
                t.deadline().is_some_and(|d| d <= now) && t.on_deadline(now)
            };
            if more {
                come_back(slot);
            }
        }
    }
    Ok(())
}

/// A device left queue work after serving a backend fd or a deadline (RX buffers ran
/// out of budget this round): the RX queue's eventfd brings it back.
fn come_back(slot: &VirtioSlot) {
    if let Some(evt) = slot.queue_evts.first() {
        let _ = evt.write(1);
    }
}

/// How long poll may wait at `now` for an fd before the earliest device deadline:
/// whole milliseconds, rounded up so that it never wakes just before the deadline
/// and spins.
fn poll_timeout(deadline: Option<Instant>, now: Instant) -> PollTimeout {
    let Some(deadline) = deadline else { return PollTimeout::NONE };
    let left = deadline.saturating_duration_since(now);
    let ms = left.as_nanos().div_ceil(1_000_000);
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

/// An `EventFd` as a borrowed fd (vmm-sys-util's type only offers the raw fd).
fn event_fd_borrow(evt: &vmm_sys_util::eventfd::EventFd) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is owned by `evt`, which outlives the returned borrow (same
    // lifetime), so it stays open for as long as the BorrowedFd exists.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(evt.as_raw_fd()) }
}

/// How long stopping waits for vCPU threads. One can be stuck outside KVM_RUN, e.g.
/// writing console output to a pipe nobody reads; the process exit ends it.
const VCPU_STOP_DEADLINE: Duration = Duration::from_secs(2);

/// Tells every vCPU to finish and kicks it out of the guest until it has. A kick that
/// lands just before a thread enters KVM_RUN is lost, so kicks repeat, up to a deadline.
fn stop_vcpus(running: &AtomicBool, threads: Vec<JoinHandle<()>>) {
    running.store(false, Ordering::SeqCst);
    let start = Instant::now();
    for t in threads {
        while !t.is_finished() && start.elapsed() < VCPU_STOP_DEADLINE {
            if t.kill(kick_signal()).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            log::warn!("a vCPU thread did not stop within {VCPU_STOP_DEADLINE:?}; leaving it to process exit");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_waits_until_the_earliest_deadline_and_no_less() {
        let now = Instant::now();
        let at = |d: Duration| poll_timeout(Some(now + d), now).as_millis();
        assert_eq!(poll_timeout(None, now), PollTimeout::NONE, "no deadline: wait for an fd");
        assert_eq!(poll_timeout(Some(now), now + Duration::from_secs(1)), PollTimeout::ZERO, "past: do not wait");
        assert_eq!(at(Duration::from_micros(100)), Some(1), "part of a millisecond rounds up, so poll never wakes early");
        assert_eq!(at(Duration::from_micros(2_001)), Some(3));
        assert_eq!(at(Duration::from_secs(3600)), Some(3_600_000));
    }
}
