//! vCPUs: configuring one, and its run loop.
//!
//! The loop is a small state machine. `Running` enters the guest and routes the exit
//! through the port or MMIO bus; anything that ends the VM is reported to the
//! [`StopSink`] and moves the vCPU to `Finished`. No device logic lives here.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::boot::EntryPoint;
use crate::arch::x86_64::{cpuid, msr, regs};
use crate::devices::bus::Bus;
use crate::devices::{StopReason, StopSink};

/// Local APIC register offsets and delivery modes for the LINT pins.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    #[error("cannot set {what} of vCPU {id}")]
    Set {
        id: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted {set} of {want} boot MSRs on vCPU {id}")]
    Msrs { id: u8, set: usize, want: usize },
    #[error("cannot set up boot registers")]
    Regs(#[from] regs::RegsError),
}

/// What the loop does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    Running,
    Finished,
}

/// The buses and sinks every vCPU shares.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub sink: Arc<StopSink>,
    /// Exits to userspace, all vCPUs together.
    pub exits: Arc<AtomicU64>,
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    ctx: VcpuContext,
}

impl Vcpu {
    /// Creates vCPU `id` of `count` and sets its boot state. Only the boot vCPU (0) gets
    /// entry registers; the others wait for the guest's INIT/SIPI in the in-kernel APIC.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        supported_cpuid: &CpuId,
        id: u8,
        count: u8,
        entry: EntryPoint,
        ctx: VcpuContext,
    ) -> Result<Vcpu, VcpuError> {
        let fd = vm.create_vcpu(u64::from(id)).map_err(|e| VcpuError::Create(id, e))?;
        let set = |what, source| VcpuError::Set { id, what, source };
        fd.set_cpuid2(&cpuid::for_vcpu(supported_cpuid, id, count)).map_err(|e| set("CPUID", e))?;
        let msrs = msr::boot_msrs();
        let n = fd.set_msrs(&msrs).map_err(|e| set("MSRs", e))?;
        if n != msrs.as_slice().len() {
            return Err(VcpuError::Msrs { id, set: n, want: msrs.as_slice().len() });
        }
        fd.set_fpu(&regs::boot_fpu()).map_err(|e| set("FPU", e))?;
        let mut lapic = fd.get_lapic().map_err(|e| set("local APIC", e))?;
        set_lint_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lint_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(|e| set("local APIC", e))?;
        if id == 0 {
            let sregs = fd.get_sregs().map_err(|e| set("special registers", e))?;
            let sregs = regs::setup_sregs(mem, entry, sregs)?;
            fd.set_sregs(&sregs).map_err(|e| set("special registers", e))?;
            fd.set_regs(&regs::boot_regs(entry)).map_err(|e| set("registers", e))?;
        }
        Ok(Vcpu { id, fd, ctx })
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// Where this vCPU reports a stop.
    pub fn sink(&self) -> Arc<StopSink> {
        self.ctx.sink.clone()
    }

    /// Stops the VM with an error instead of running this vCPU.
    pub fn fail(self, why: String) {
        self.ctx.sink.stop(StopReason::Error(why));
    }

    /// Runs the guest on this vCPU until the VM stops or `running` turns false.
    pub fn run(mut self, running: &AtomicBool) {
        let mut state = VcpuState::Running;
        while state == VcpuState::Running {
            state = if running.load(Ordering::Acquire) { self.run_once() } else { VcpuState::Finished };
        }
        log::debug!("vcpu{} finished", self.id);
    }

    fn run_once(&mut self) -> VcpuState {
        let result = self.fd.run();
        self.ctx.exits.fetch_add(1, Ordering::Relaxed);
        let stop = |reason| {
            self.ctx.sink.stop(reason);
            VcpuState::Finished
        };
        match result {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.ctx.pio.read(u64::from(port), data) {
                    data.fill(0);
                }
                VcpuState::Running
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                self.ctx.pio.write(u64::from(port), data);
                VcpuState::Running
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.ctx.mmio.read(addr, data) {
                    data.fill(0);
                }
                VcpuState::Running
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.ctx.mmio.write(addr, data);
                VcpuState::Running
            }
            // Linux resets through the i8042 or a system event; a triple fault is
            // a guest that crashed without a word (or a hand-made reset, which the
            // guests moat boots do not use).
            Ok(VcpuExit::Shutdown) => stop(StopReason::TripleFault(self.id)),
            Ok(VcpuExit::Hlt) => stop(StopReason::Crashed(format!("vcpu{} halted", self.id))),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => stop(StopReason::PowerOff(0)),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => stop(StopReason::Reset),
                other => stop(StopReason::Crashed(format!("system event {other}"))),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                stop(StopReason::Error(format!("vcpu{} failed to enter the guest (reason {reason:#x}, cpu {cpu})", self.id)))
            }
            Ok(VcpuExit::InternalError) => {
                stop(StopReason::Error(format!("KVM internal error on vcpu{}", self.id)))
            }
            Ok(other) => stop(StopReason::Error(format!("unexpected exit on vcpu{}: {other:?}", self.id))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => VcpuState::Running,
            Err(e) => stop(StopReason::Error(format!("KVM_RUN failed on vcpu{}: {e}", self.id))),
        }
    }
}

/// Sets the delivery mode (bits 8-10) of the LVT register at `offset`.
fn set_lint_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_mode_is_set_in_place() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0xff_u8 as std::os::raw::c_char;
        regs[APIC_LVT0 + 1] = 0xff_u8 as std::os::raw::c_char;
        set_lint_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0xff);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0xff);
        set_lint_mode(&mut regs, APIC_LVT1, APIC_MODE_NMI);
        assert_eq!(regs[APIC_LVT1 + 1] as u8, 0x04);
    }
}
