//! Emulated devices and the buses that route guest port and MMIO accesses to them.

pub mod bus;
pub mod legacy;
pub mod virtio;

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Why the guest stopped. The first reason reported wins; later ones are ignored
/// (a guest that powers off and then triple-faults has still powered off).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The agent asked for power-off with this status (0 = clean).
    PowerOff(u8),
    /// The guest asked for a reset (reboot, or a panic with `panic=-1`) without the
    /// agent having asked for a power-off.
    Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN): the guest crashed too badly to
    /// say anything, which a reboot request is not.
    TripleFault(u8),
    /// The guest halted its last CPU or reported a crash.
    Crashed(String),
    /// The VMM was told to stop by this signal.
    Signal(i32),
    /// A vCPU or device failed; the message says how.
    Error(String),
}

/// Where devices and vCPUs report that the VM must stop; the main loop waits on it.
pub struct StopSink {
    reason: Mutex<Option<StopReason>>,
    evt: EventFd,
}

impl StopSink {
    pub fn new() -> std::io::Result<StopSink> {
        Ok(StopSink { reason: Mutex::new(None), evt: EventFd::new(libc::EFD_NONBLOCK)? })
    }

    /// Records `reason` unless one was recorded already, and wakes the main loop.
    pub fn stop(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        // A full eventfd counter still wakes the reader, so an error here is harmless.
        let _ = self.evt.write(1);
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = StopSink::new().expect("sink");
        assert_eq!(s.reason(), None);
        s.stop(StopReason::PowerOff(0));
        s.stop(StopReason::Reset);
        assert_eq!(s.reason(), Some(StopReason::PowerOff(0)));
        assert_eq!(s.event_fd().read().expect("event"), 2);
    }
}
