//! The virtio-mmio transport (virtio 1.2, section 4.2.2): one 4 KiB window per device,
//! announced to the guest kernel with `virtio_mmio.device=4K@<base>:<irq>`.
//!
//! Everything here is driven by the guest, so every write is checked: registers take
//! only aligned 32-bit accesses, queue setup is refused once the device is live, a
//! queue selector past the last queue selects nothing, features the device did not
//! offer fail FEATURES_OK, and queues are validated against guest memory before the
//! device ever sees them.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Activation, IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5441_4f4d; // "MOAT"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;
const WINDOW: u64 = 0x1000;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqLine>,
    queues: Vec<Queue>,
    queue_sel: u32,
    /// Queues the driver gave an impossible size; they fail activation.
    bad_size: Vec<bool>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    active: bool,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: Arc<IrqLine>) -> MmioTransport {
        let queues = fresh_queues(device.as_ref());
        MmioTransport {
            device,
            mem,
            irq,
            bad_size: vec![false; queues.len()],
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            active: false,
        }
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// A notification for queue `index`, from the ioeventfd or a QueueNotify write.
    /// Returns true if the device left work for a later round.
    pub fn notify(&mut self, index: usize) -> bool {
        self.active && index < self.queues.len() && self.device.process_queue(index)
    }

    /// The device's host-side fds, polled only while the device is live (or always,
    /// for a device that asks to be).
    pub fn backend_fds(&self) -> Vec<(std::os::fd::RawFd, bool, bool)> {
        if self.active || self.device.polled_while_inactive() {
            self.device.backend_fds()
        } else {
            Vec::new()
        }
    }

    pub fn backend_ready(&mut self, fd: std::os::fd::RawFd, ready: super::Readiness) -> bool {
        if !self.active && !self.device.polled_while_inactive() {
            return false;
        }
        let more = self.device.backend_ready(fd, ready);
        if self.active && self.status & STATUS_NEEDS_RESET == 0 && self.device.needs_reset() {
            self.status |= STATUS_NEEDS_RESET;
            self.irq.trigger(super::INT_CONFIG);
        }
        self.active && more
    }

    /// When the live device wants to be called back without any fd being ready.
    pub fn deadline(&self) -> Option<std::time::Instant> {
        if self.active {
            self.device.deadline()
        } else {
            None
        }
    }

    /// The device's deadline has come. Returns true if it left queue work.
    pub fn on_deadline(&mut self, now: std::time::Instant) -> bool {
        self.active && self.device.on_deadline(now)
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only change between FEATURES_OK and DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.queues = fresh_queues(self.device.as_ref());
        self.bad_size = vec![false; self.queues.len()];
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.irq.ack(u32::MAX);
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (the spec's order: ACKNOWLEDGE, DRIVER,
        // FEATURES_OK, DRIVER_OK); clearing one without a reset is ignored.
        if value & self.status != self.status {
            log::debug!("virtio-mmio: status {value:#x} would clear bits of {:#x}; ignored", self.status);
            return;
        }
        let new = value & !self.status;
        if new & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            let version_1 = 1u64 << VIRTIO_F_VERSION_1;
            if self.driver_features & !offered != 0 || self.driver_features & version_1 == 0 {
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                log::debug!(
                    "virtio-mmio (type {}): driver features {:#x} not acceptable (offered {offered:#x})",
                    self.device.device_type(),
                    self.driver_features
                );
                self.status = value & !STATUS_FEATURES_OK & !STATUS_DRIVER_OK;
                return;
            }
            self.device.set_acked_features(self.driver_features);
        }
        if new & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK != 0 && !self.active {
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    fn activate(&mut self) {
        let ready: Vec<usize> = (0..self.queues.len()).filter(|&i| self.queues[i].ready()).collect();
        let result = if ready.len() != self.queues.len() {
            Err(super::ActivateError::QueueCount { got: ready.len(), want: self.queues.len() })
        } else if let Some(bad) =
            (0..self.queues.len()).find(|&i| self.bad_size[i] || !self.queues[i].is_valid(&self.mem))
        {
            Err(super::ActivateError::InvalidQueue(bad))
        } else {
            // The device gets its own copies; the transport keeps its queues so the
            // registers still read back what the driver configured.
            self.queues
                .iter()
                .map(|q| Queue::try_from(q.state()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| super::ActivateError::InvalidQueue(0))
                .and_then(|queues| self.device.activate(Activation { mem: self.mem.clone(), queues, irq: self.irq.clone() }))
        };
        match result {
            Ok(()) => self.active = true,
            Err(e) => {
                // Guest-caused and repeatable at will, so not above debug.
                log::debug!("virtio-mmio (type {}): cannot activate: {e}", self.device.device_type());
                self.status |= STATUS_NEEDS_RESET;
                self.irq.trigger(super::INT_CONFIG);
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let features = self.device.features();
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected().map_or(0, |q| q.max_size().into()),
            REG_QUEUE_READY => self.selected().map_or(0, |q| q.ready().into()),
            REG_INTERRUPT_STATUS => self.irq.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let setup = self.queue_setup_allowed();
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM if setup => {
                let sel = self.queue_sel as usize;
                if let Some(q) = self.queues.get_mut(sel) {
                    // A size that is zero, too big or not a power of two is remembered
                    // and fails activation, rather than being silently replaced.
                    let ok = u16::try_from(v).ok().is_some_and(|n| q.try_set_size(n).is_ok());
                    self.bad_size[sel] = !ok;
                }
            }
            REG_QUEUE_READY if setup => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_DESC_LOW if setup => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            REG_QUEUE_DESC_HIGH if setup => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            REG_QUEUE_AVAIL_LOW if setup => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            REG_QUEUE_AVAIL_HIGH if setup => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            REG_QUEUE_USED_LOW if setup => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            REG_QUEUE_USED_HIGH if setup => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            // With ioeventfds registered the kernel consumes valid notifications; what
            // reaches here is out of range and ignored.
            REG_QUEUE_NOTIFY => {
                self.notify(v as usize);
            }
            REG_INTERRUPT_ACK => self.irq.ack(v),
            REG_STATUS => self.write_status(v),
            _ => log::debug!("virtio-mmio: write {v:#x} to {offset:#x} ignored"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected() {
            f(q);
        }
    }
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| Queue::new(max).expect("device queue sizes are non-zero powers of two (checked in tests)"))
        .collect()
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            if offset < WINDOW {
                self.device.read_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if offset < WINDOW {
                self.device.write_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        if data.len() == 4 && offset.is_multiple_of(4) {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_reg(offset, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    /// A device that records what the transport did to it.
    #[derive(Default)]
    struct Probe {
        acked: Arc<Mutex<u64>>,
        activations: Arc<Mutex<usize>>,
        notified: Arc<Mutex<Vec<usize>>>,
        resets: Arc<Mutex<usize>>,
        config: [u8; 8],
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | 1
        }
        fn set_acked_features(&mut self, acked: u64) {
            *self.acked.lock().expect("lock") = acked;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, a: Activation) -> Result<(), super::super::ActivateError> {
            assert_eq!(a.queues.len(), 2);
            *self.activations.lock().expect("lock") += 1;
            Ok(())
        }
        fn process_queue(&mut self, index: usize) -> bool {
            self.notified.lock().expect("lock").push(index);
            false
        }
        fn reset(&mut self) {
            *self.resets.lock().expect("lock") += 1;
        }
    }

    type Counter = Arc<Mutex<usize>>;

    fn transport() -> (MmioTransport, Counter, Arc<Mutex<Vec<usize>>>, Counter) {
        let probe = Probe { config: [1, 2, 3, 4, 5, 6, 7, 8], ..Default::default() };
        let (act, notified, resets) = (probe.activations.clone(), probe.notified.clone(), probe.resets.clone());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let irq = Arc::new(IrqLine::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")));
        (MmioTransport::new(Box::new(probe), mem, irq), act, notified, resets)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }
    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, base: u64) {
        w(t, REG_QUEUE_SEL, sel);
        w(t, REG_QUEUE_NUM, 16);
        w(t, REG_QUEUE_DESC_LOW, base as u32);
        w(t, REG_QUEUE_AVAIL_LOW, (base + 0x100) as u32);
        w(t, REG_QUEUE_USED_LOW, (base + 0x200) as u32);
        w(t, REG_QUEUE_READY, 1);
    }

    fn negotiate(t: &mut MmioTransport, features_hi: u32) {
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, features_hi);
        w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    }

    #[test]
    fn identity_registers() {
        let (mut t, ..) = transport();
        assert_eq!(r(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 4);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 0);
    }

    #[test]
    fn full_handshake_activates_and_notifies() {
        let (mut t, act, notified, resets) = transport();
        negotiate(&mut t, 1);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 16);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(*act.lock().expect("lock"), 1);
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        w(&mut t, REG_QUEUE_NOTIFY, 9); // no such queue
        assert_eq!(*notified.lock().expect("lock"), vec![1]);
        // Queue setup is frozen once live.
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        w(&mut t, REG_STATUS, 0);
        assert_eq!(*resets.lock().expect("lock"), 1);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(notified.lock().expect("lock").len(), 1, "no notifications after reset");
    }

    #[test]
    fn features_not_offered_or_without_version_1_are_refused() {
        let (mut t, ..) = transport();
        negotiate(&mut t, 0); // no VERSION_1
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        let (mut t, ..) = transport();
        negotiate(&mut t, 1 | 2); // bit 33 not offered
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn invalid_queue_is_not_activated() {
        let (mut t, act, ..) = transport();
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, 0x1000);
        w(&mut t, REG_QUEUE_SEL, 1);
        w(&mut t, REG_QUEUE_NUM, 3); // not a power of two
        w(&mut t, REG_QUEUE_DESC_LOW, 0x3000);
        w(&mut t, REG_QUEUE_READY, 1);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(*act.lock().expect("lock"), 0);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        // Rings outside guest memory are refused the same way.
        let (mut t, act, ..) = transport();
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0xffff_f000);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(*act.lock().expect("lock"), 0);
    }

    #[test]
    fn missing_queue_is_not_activated() {
        let (mut t, act, ..) = transport();
        negotiate(&mut t, 1);
        setup_queue(&mut t, 0, 0x1000);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(*act.lock().expect("lock"), 0);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let (mut t, ..) = transport();
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(REG_STATUS + 1, &[1, 2, 3, 4]);
        t.write(REG_STATUS, &[1]);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        let mut c = [0u8; 4];
        t.read(CONFIG_SPACE + 4, &mut c);
        assert_eq!(c, [5, 6, 7, 8]);
        t.read(CONFIG_SPACE + 6, &mut c);
        assert_eq!(c, [7, 8, 0, 0]);
        t.read(WINDOW + 4, &mut c);
        w(&mut t, 0x7fc, 1);
        // Selecting a queue that does not exist reads as absent and is not writable.
        w(&mut t, REG_QUEUE_SEL, 99);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn clearing_status_bits_without_reset_is_ignored() {
        let (mut t, ..) = transport();
        negotiate(&mut t, 1);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(r(&mut t, REG_STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    }
}
