//! The KVM VM: its file descriptor, its memory slots and the in-kernel interrupt
//! controllers (PIC, IO-APIC, local APICs) and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a capability moat needs: {0}")]
    MissingCap(&'static str),
    #[error("cannot create the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("cannot set up {0}")]
    Setup(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot register guest memory slot {0}")]
    MemorySlot(u32, #[source] kvm_ioctls::Error),
    #[error("cannot register an interrupt for IRQ {0}")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
}

pub struct Vm {
    // Field order matters: the VM fd is dropped (and KVM lets go of guest memory)
    // before the memory is unmapped.
    fd: VmFd,
    memory: GuestMemoryMmap,
}

/// Opens /dev/kvm and checks it offers what a moat VM uses.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(VmError::ApiVersion(version));
    }
    for (cap, name) in [
        (kvm_ioctls::Cap::Irqchip, "IRQCHIP"),
        (kvm_ioctls::Cap::Irqfd, "IRQFD"),
        (kvm_ioctls::Cap::Ioeventfd, "IOEVENTFD"),
        (kvm_ioctls::Cap::Pit2, "PIT2"),
        (kvm_ioctls::Cap::UserMemory, "USER_MEMORY"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

impl Vm {
    /// Creates the VM with its interrupt controllers, and registers `memory`.
    pub fn new(kvm: &Kvm, memory: GuestMemoryMmap) -> Result<Vm, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(|e| VmError::Setup("the TSS address", e))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| VmError::Setup("the identity map address", e))?;
        fd.create_irq_chip().map_err(|e| VmError::Setup("the in-kernel irqchip", e))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(|e| VmError::Setup("the PIT", e))?;

        for (slot, region) in memory.iter().enumerate() {
            let slot = slot as u32;
            let host = memory
                .get_host_address(region.start_addr())
                .map_err(|_| VmError::MemorySlot(slot, kvm_ioctls::Error::new(libc::EFAULT)))?;
            let r = kvm_userspace_memory_region {
                slot,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: `host..host+len` is a live mapping of `memory`. It stays mapped
            // as long as any user of the VM can run the guest: this Vm keeps a
            // handle, the virtio transports keep clones, vCPU threads are joined (or
            // the process exits) before the Microvm is dropped, and huge-page-backed
            // guest RAM is never unmapped at all. Slots are distinct and regions do
            // not overlap (vm-memory checks that when it builds the collection).
            unsafe { fd.set_user_memory_region(r) }.map_err(|e| VmError::MemorySlot(slot, e))?;
        }
        Ok(Vm { fd, memory })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Routes writes to `evt` to guest IRQ `irq` (the in-kernel IO-APIC pin).
    pub fn register_irq(&self, evt: &EventFd, irq: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, irq).map_err(|e| VmError::Irqfd(irq, e))
    }
}
