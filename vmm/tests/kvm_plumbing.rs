//! The VMM's plumbing against the host's real /dev/kvm, with tiny real-mode guests:
//! VM and vCPU setup, the port bus, the console, the control port and the stop paths.
//! These need no bootable kernel, so they also run where /dev/kvm is PVM.

use std::io::Write;
use std::sync::{Arc, Mutex};

use moat_vmm::{Microvm, SerialSink, StopReason};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, d: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(d);
        Ok(d.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn kvm_available() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("\n*** SKIPPED: /dev/kvm is missing; the VMM plumbing tests did not run ***\n");
    false
}

/// `mov dx, port; mov al, value; out dx, al`
fn out8(code: &mut Vec<u8>, port: u16, value: u8) {
    code.push(0xba);
    code.extend_from_slice(&port.to_le_bytes());
    code.extend_from_slice(&[0xb0, value, 0xee]);
}

fn run(code: &[u8]) -> (moat_vmm::Outcome, Vec<u8>) {
    let console = Captured::default();
    let vm = Microvm::with_test_code(code, 32, SerialSink::with(Some(Box::new(console.clone()))))
        .expect("build test VM");
    let outcome = vm.run().expect("run test VM");
    let out = console.0.lock().expect("lock").clone();
    (outcome, out)
}

#[test]
fn console_ready_and_poweroff() {
    if !kvm_available() {
        return;
    }
    let mut code = Vec::new();
    for b in b"hello from the guest\n" {
        out8(&mut code, 0x3f8, *b);
    }
    out8(&mut code, 0x0f00, 123); // ready
    out8(&mut code, 0x0f01, 0); // power off, status 0
    code.push(0xf4); // hlt (never reached)
    let (outcome, console) = run(&code);
    assert_eq!(outcome.reason, StopReason::PowerOff(0));
    assert_eq!(console, b"hello from the guest\n");
    let boot = outcome.boot.expect("the ready write was recorded");
    assert!(boot.exits >= 21, "every console byte is an exit, got {}", boot.exits);
    assert!(outcome.exits > boot.exits);
}

#[test]
fn partial_console_line_is_not_lost() {
    if !kvm_available() {
        return;
    }
    let mut code = Vec::new();
    for b in b"no newline" {
        out8(&mut code, 0x3f8, *b);
    }
    out8(&mut code, 0x0f01, 7);
    let (outcome, console) = run(&code);
    assert_eq!(outcome.reason, StopReason::PowerOff(7));
    assert_eq!(console, b"no newline");
    assert_eq!(outcome.boot, None);
}

#[test]
fn i8042_reset_is_a_reset() {
    if !kvm_available() {
        return;
    }
    let mut code = Vec::new();
    // Unclaimed ports read as zero and writes to them are ignored.
    code.extend_from_slice(&[0xba, 0x34, 0x12, 0xec]); // mov dx, 0x1234; in al, dx
    out8(&mut code, 0x1234, 0x55);
    out8(&mut code, 0x64, 0xfe);
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp $ : spin until stopped
    let (outcome, _) = run(&code);
    assert_eq!(outcome.reason, StopReason::Reset);
}

#[test]
fn unclaimed_mmio_reads_zero_and_writes_are_ignored() {
    if !kvm_available() {
        return;
    }
    // A 1 MiB guest: real mode reaches 0xffff:0x10 = 0x100000, just past RAM, which is
    // MMIO that no device claims.
    let mut code = Vec::new();
    code.extend_from_slice(&[0xb8, 0xff, 0xff, 0x8e, 0xd8]); // mov ax, 0xffff; mov ds, ax
    code.extend_from_slice(&[0xc6, 0x06, 0x10, 0x00, 0xab]); // mov byte [0x10], 0xab
    code.extend_from_slice(&[0xa0, 0x10, 0x00]); // mov al, [0x10]
    code.extend_from_slice(&[0xba, 0x01, 0x0f, 0xee]); // mov dx, 0x0f01; out dx, al
    let vm = Microvm::with_test_code(&code, 1, SerialSink::discard()).expect("build test VM");
    let outcome = vm.run().expect("run");
    // The power-off status is what the read returned.
    assert_eq!(outcome.reason, StopReason::PowerOff(0));
    assert!(outcome.exits >= 3, "the MMIO accesses exited to the VMM");
}

#[test]
fn guest_memory_is_shared_with_the_vmm() {
    if !kvm_available() {
        return;
    }
    let mut code = Vec::new();
    code.extend_from_slice(&[0xb8, 0x00, 0x20, 0x8e, 0xd8]); // mov ax, 0x2000; mov ds, ax
    code.extend_from_slice(&[0xc6, 0x06, 0x34, 0x00, 0xab]); // mov byte [0x34], 0xab
    out8(&mut code, 0x0f01, 0);
    let vm = Microvm::with_test_code(&code, 32, SerialSink::discard()).expect("build");
    let mem = vm.memory().clone();
    let outcome = vm.run().expect("run");
    assert_eq!(outcome.reason, StopReason::PowerOff(0));
    let v: u8 = vm_memory::Bytes::read_obj(&mem, vm_memory::GuestAddress(0x20034)).expect("read");
    assert_eq!(v, 0xab);
}

#[test]
fn vcpus_over_the_limit_fail_before_kvm_is_touched() {
    if !kvm_available() {
        return;
    }
    // More than any KVM allows is caught by config validation before KVM is touched.
    let cfg = moat_config::VmConfig { kernel: "/nonexistent".into(), vcpus: 200, ..Default::default() };
    let err = Microvm::try_from(cfg).err().expect("must fail");
    assert!(err.to_string().contains("invalid VM config"), "{err}");
}
