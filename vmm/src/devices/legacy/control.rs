//! moat's control port: how `moat-agent` tells the VMM it is ready (the boot timer,
//! as Firecracker's boot-timer device does over MMIO) and that the guest is done
//! (power-off with a status). Port I/O, so the agent needs only `ioperm`.
//!
//! | offset | write | meaning |
//! | --- | --- | --- |
//! | 0 | `READY_MAGIC` | the agent is up; the VMM records the time since it started |
//! | 1 | status | power off now; the guest has synced its disks |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::devices::bus::BusDevice;
use crate::devices::{StopReason, StopSink};

pub const CONTROL_BASE: u64 = 0x0f00;
pub const CONTROL_LEN: u64 = 2;
pub const READY_MAGIC: u8 = 123;
const OFFSET_READY: u64 = 0;
const OFFSET_POWEROFF: u64 = 1;

/// When the guest became ready, and how many VM exits it took to get there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootTimes {
    pub ready_after: Duration,
    pub exits: u64,
}

pub struct ControlPort {
    started: Instant,
    exits: Arc<AtomicU64>,
    ready: Arc<Mutex<Option<BootTimes>>>,
    sink: Arc<StopSink>,
}

impl ControlPort {
    /// `started` is when the VMM process started; `exits` counts VM exits so far.
    pub fn new(started: Instant, exits: Arc<AtomicU64>, sink: Arc<StopSink>) -> ControlPort {
        ControlPort { started, exits, ready: Arc::new(Mutex::new(None)), sink }
    }

    /// The shared slot where the ready time lands.
    pub fn ready_slot(&self) -> Arc<Mutex<Option<BootTimes>>> {
        self.ready.clone()
    }
}

impl BusDevice for ControlPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            OFFSET_READY if value == READY_MAGIC => {
                let mut slot = self.ready.lock().unwrap_or_else(|p| p.into_inner());
                // Only the first ready counts: a guest writing it again must not move it.
                if slot.is_none() {
                    let t = BootTimes {
                        ready_after: self.started.elapsed(),
                        exits: self.exits.load(Ordering::Relaxed),
                    };
                    log::info!(
                        "guest ready {:.1} ms after VMM start ({} VM exits to the VMM)",
                        t.ready_after.as_secs_f64() * 1000.0,
                        t.exits
                    );
                    *slot = Some(t);
                }
            }
            OFFSET_POWEROFF => self.sink.stop(StopReason::PowerOff(value)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_is_recorded_once_and_poweroff_stops() {
        let sink = Arc::new(StopSink::new().expect("sink"));
        let exits = Arc::new(AtomicU64::new(41));
        let mut c = ControlPort::new(Instant::now(), exits.clone(), sink.clone());
        let slot = c.ready_slot();
        c.write(OFFSET_READY, &[7]);
        assert_eq!(*slot.lock().expect("lock"), None, "only the magic value counts");
        c.write(OFFSET_READY, &[READY_MAGIC]);
        let first = slot.lock().expect("lock").expect("ready recorded");
        assert_eq!(first.exits, 41);
        exits.store(99, Ordering::Relaxed);
        c.write(OFFSET_READY, &[READY_MAGIC]);
        assert_eq!(slot.lock().expect("lock").expect("ready").exits, 41);
        assert_eq!(sink.reason(), None);
        c.write(OFFSET_POWEROFF, &[3]);
        assert_eq!(sink.reason(), Some(StopReason::PowerOff(3)));
        c.write(OFFSET_POWEROFF, &[]);
    }
}
