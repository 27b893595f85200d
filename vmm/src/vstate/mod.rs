//! KVM state: the VM and its memory, and the vCPUs. All of the VMM's `unsafe` that
//! touches KVM lives here.

pub mod memory;
pub mod vcpu;
pub mod vm;
