//! The guest's console: an 8250 UART (vm-superio) whose output goes to stdout or a file.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::super::bus::BusDevice;

/// COM1: what `console=ttyS0` drives.
pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console bytes go. Buffered by line: the UART flushes after every byte, which
/// would cost a write(2) per byte; a line at a time keeps console output cheap while a
/// line is never held back once complete. [`SerialSink::flush_all`] pushes out a
/// partial last line when the VM stops.
#[derive(Clone)]
pub struct SerialSink {
    inner: Arc<Mutex<LineBuffer>>,
}

struct LineBuffer {
    out: Option<Box<dyn Write + Send>>,
    buf: Vec<u8>,
    /// Bytes still allowed out; the guest controls the console, so it must not be
    /// able to fill the host's disk through it.
    budget: u64,
    truncated: bool,
}

const MAX_PENDING: usize = 4096;
/// Console bytes one VM may write before the rest is dropped (with one notice).
pub const DEFAULT_CONSOLE_LIMIT: u64 = 64 << 20;

impl SerialSink {
    pub fn stdout() -> SerialSink {
        Self::with(Some(Box::new(io::stdout())))
    }

    pub fn file(path: &Path) -> io::Result<SerialSink> {
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self::with(Some(Box::new(f))))
    }

    pub fn discard() -> SerialSink {
        Self::with(None)
    }

    pub fn with(out: Option<Box<dyn Write + Send>>) -> SerialSink {
        Self::with_limit(out, DEFAULT_CONSOLE_LIMIT)
    }

    /// A sink that passes at most `limit` bytes, then writes one truncation notice.
    pub fn with_limit(out: Option<Box<dyn Write + Send>>, limit: u64) -> SerialSink {
        let lb = LineBuffer { out, buf: Vec::with_capacity(256), budget: limit, truncated: false };
        SerialSink { inner: Arc::new(Mutex::new(lb)) }
    }

    /// Writes out whatever is buffered, complete line or not. Skipped if a vCPU
    /// thread still holds the buffer (stuck writing to a full pipe): stopping the VM
    /// must not wait on the console's reader.
    pub fn flush_all(&self) {
        match self.inner.try_lock() {
            Ok(mut lb) => lb.drain(),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().drain(),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
    }
}

impl LineBuffer {
    fn drain(&mut self) {
        if let Some(out) = self.out.as_mut() {
            let n = self.buf.len().min(usize::try_from(self.budget).unwrap_or(usize::MAX));
            self.budget -= n as u64;
            // Console output is best effort: a closed stdout must not stop the guest.
            let _ = out.write_all(&self.buf[..n]);
            if n < self.buf.len() && !self.truncated {
                self.truncated = true;
                let _ = out.write_all(b"\n[moat-vmm: console output limit reached; the rest is dropped]\n");
            }
            let _ = out.flush();
        }
        self.buf.clear();
    }
}

impl Write for SerialSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut lb = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if lb.out.is_none() || lb.truncated {
            return Ok(data.len());
        }
        lb.buf.extend_from_slice(data);
        if data.contains(&b'\n') || lb.buf.len() >= MAX_PENDING {
            lb.drain();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Deliberately lazy; see the type's documentation.
        Ok(())
    }
}

/// The UART on the port bus.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialSink>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, out: SerialSink) -> SerialConsole {
        SerialConsole { uart: Serial::new(IrqTrigger(irq), out) }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < COM1_LEN {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < COM1_LEN {
            // The only failures are from the sink or the irqfd, neither of which the
            // guest can do anything about; the byte is dropped and the guest goes on.
            let _ = self.uart.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, d: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(d);
            Ok(d.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn console_output_is_line_buffered_and_complete() {
        let captured = Shared::default();
        let sink = SerialSink::with(Some(Box::new(captured.clone())));
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut uart = SerialConsole::new(irq.try_clone().expect("clone"), sink.clone());
        for b in b"hello\nwor" {
            uart.write(0, &[*b]);
        }
        assert_eq!(captured.0.lock().expect("lock").as_slice(), b"hello\n");
        sink.flush_all();
        assert_eq!(captured.0.lock().expect("lock").as_slice(), b"hello\nwor");
    }

    #[test]
    fn console_output_is_capped() {
        let captured = Shared::default();
        let sink = SerialSink::with_limit(Some(Box::new(captured.clone())), 10);
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut uart = SerialConsole::new(irq, sink.clone());
        for _ in 0..3 {
            for b in b"0123456\n" {
                uart.write(0, &[*b]);
            }
        }
        sink.flush_all();
        let out = captured.0.lock().expect("lock").clone();
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(text, "0123456\n01\n[moat-vmm: console output limit reached; the rest is dropped]\n");
    }

    #[test]
    fn line_status_reports_transmitter_empty() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut uart = SerialConsole::new(irq, SerialSink::discard());
        let mut lsr = [0u8];
        uart.read(5, &mut lsr);
        // THR empty and transmitter idle: the guest driver may send.
        assert_eq!(lsr[0] & 0x60, 0x60);
        // Wide or out-of-range accesses are answered with zeros, never a panic.
        let mut wide = [0xffu8; 4];
        uart.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
        uart.write(100, &[1]);
    }

    #[test]
    fn interrupt_on_transmit_when_enabled() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut uart = SerialConsole::new(irq.try_clone().expect("clone"), SerialSink::discard());
        uart.write(1, &[0x02]); // IER: THR empty interrupt
        uart.write(0, b"x");
        assert!(irq.read().expect("irq raised") >= 1);
    }
}
