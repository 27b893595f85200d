//! An address bus: non-overlapping ranges, each owned by one device. There is one for
//! port I/O and one for MMIO; every vCPU exit that touches a device goes through one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device or is empty")]
    Overlap { base: u64, len: u64 },
}

struct Range {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::Overlap { base, len })?;
        // The range starting at or below `base` must end before it; the next one must
        // start at or after `end`.
        let before = self.ranges.range(..=base).next_back();
        let after = self.ranges.range(base..).next();
        let clash = before.is_some_and(|(b, r)| b + r.len > base) || after.is_some_and(|(b, _)| *b < end);
        if clash {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    /// The device owning `addr`, and `addr`'s offset inside it. The whole access must
    /// fall inside the range: a straddling access goes to nobody.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&Arc<Mutex<dyn BusDevice>>, u64)> {
        let (base, r) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= r.len).then_some((&r.device, offset))
    }

    /// Routes a read; returns false (leaving `data` untouched) if no device owns it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((d, offset)) => {
                d.lock().unwrap_or_else(|p| p.into_inner()).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write; returns false if no device owns it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((d, offset)) => {
                d.lock().unwrap_or_else(|p| p.into_inner()).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_offset() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, dev.clone()).expect("insert");
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(dev.lock().expect("lock").writes, vec![(7, vec![7])]);
        assert!(!bus.read(0x3f7, &mut b));
        assert!(!bus.write(0x400, &[1]));
    }

    #[test]
    fn straddling_access_is_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x10, Arc::new(Mutex::new(Recorder::default()))).expect("insert");
        let mut b = [0u8; 4];
        assert!(bus.read(0x100c, &mut b));
        assert!(!bus.read(0x100d, &mut b));
        assert!(!bus.read(u64::MAX - 1, &mut b));
    }

    #[test]
    fn overlaps_are_refused() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 0x10, d()).expect("insert");
        assert!(bus.insert(0x108, 0x10, d()).is_err());
        assert!(bus.insert(0xf8, 0x10, d()).is_err());
        assert!(bus.insert(0x100, 1, d()).is_err());
        assert!(bus.insert(0x200, 0, d()).is_err());
        assert!(bus.insert(u64::MAX, 2, d()).is_err());
        bus.insert(0x110, 0x10, d()).expect("adjacent is fine");
        bus.insert(0xf0, 0x10, d()).expect("adjacent below is fine");
    }
}
