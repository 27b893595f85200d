//! Just enough of the i8042 keyboard controller for a guest to reboot: Linux (with
//! `reboot=k`) writes the pulse-reset command 0xfe to the command port. The guest
//! kernel has no keyboard driver, so nothing else is emulated; reads return "empty".

use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::devices::{StopReason, StopSink};

/// Ports 0x60 (data) to 0x64 (status/command).
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    sink: Arc<StopSink>,
}

impl I8042 {
    pub fn new(sink: Arc<StopSink>) -> I8042 {
        I8042 { sink }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty and input buffer free, so a guest waiting for
        // the controller never spins.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.sink.stop(StopReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_the_vm() {
        let sink = Arc::new(StopSink::new().expect("sink"));
        let mut d = I8042::new(sink.clone());
        d.write(0, &[CMD_RESET_CPU]);
        assert_eq!(sink.reason(), None, "0xfe on the data port is not a reset");
        d.write(COMMAND_OFFSET, &[0xd1]);
        assert_eq!(sink.reason(), None);
        d.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(sink.reason(), Some(StopReason::Reset));
        let mut b = [0xffu8];
        d.read(COMMAND_OFFSET, &mut b);
        assert_eq!(b[0], 0);
    }
}
