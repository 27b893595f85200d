//! Turning a [`VmConfig`] into a ready-to-run [`Microvm`] in one step.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use linux_loader::loader::Cmdline;
use moat_config::{SerialOutput, VmConfig, MAX_CMDLINE_LEN};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot::{self, EntryPoint};
use crate::arch::x86_64::{layout, mptable};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::{control, i8042, serial, ControlPort, SerialConsole, SerialSink, I8042};
use crate::devices::virtio::mmio::{self, MmioTransport};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::fs::{self, Fs, FsError};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::muxer::{self, Muxer, MuxerError};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{IrqLine, VirtioDevice};
use crate::devices::StopSink;
use crate::VirtioSlot;
use kvm_ioctls::IoEventAddress;
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuContext, VcpuError};
use crate::vstate::vm::{self, Vm, VmError};
use crate::Microvm;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid VM config")]
    Config(#[from] moat_config::ConfigError),
    #[error(transparent)]
    Kvm(#[from] VmError),
    #[error("{requested} vCPUs requested but this host's KVM allows at most {max}")]
    TooManyVcpus { requested: u8, max: usize },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot open serial output {0}")]
    SerialFile(String, #[source] std::io::Error),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("device layout")]
    Bus(#[from] BusError),
    #[error("cannot open a device backend")]
    DeviceBackend(#[source] std::io::Error),
    #[error(transparent)]
    Vsock(#[from] MuxerError),
    #[error(transparent)]
    Disk(#[from] BlockError),
    #[error("virtio-fs {tag:?}: vhost-user backend at {socket}")]
    Fs {
        tag: String,
        socket: String,
        #[source]
        source: FsError,
    },
    #[error("cannot register a virtio queue notification")]
    Ioeventfd(#[source] kvm_ioctls::Error),
    #[error("no room for more virtio devices")]
    TooManyDevices,
    #[error("test guest code does not fit in guest memory")]
    TestCode(#[source] vm_memory::GuestMemoryError),
}

impl TryFrom<VmConfig> for Microvm {
    type Error = BuildError;

    fn try_from(config: VmConfig) -> Result<Microvm, BuildError> {
        config.validate()?;
        let serial = match &config.serial {
            SerialOutput::Stdout => SerialSink::stdout(),
            SerialOutput::None => SerialSink::discard(),
            SerialOutput::File(p) => {
                SerialSink::file(p).map_err(|e| BuildError::SerialFile(p.display().to_string(), e))?
            }
        };
        // Backends first: a missing or dead one is a configuration error, found before
        // any guest memory is committed.
        let mut fs_devices = Vec::with_capacity(config.fs.len());
        for f in &config.fs {
            let fs_err = |source: FsError| BuildError::Fs {
                tag: f.tag.clone(),
                socket: f.socket.display().to_string(),
                source,
            };
            let backend = fs::Backend::connect(&f.socket, 2).map_err(|e| fs_err(e.into()))?;
            fs_devices.push(Fs::new(&f.tag, backend).map_err(fs_err)?);
        }
        let backing = memory::Backing { huge_pages: config.huge_pages, shared: !config.fs.is_empty() };
        let mut parts = Parts::new(config.vcpus, config.memory_bytes(), backing, serial)?;
        parts.seccomp = config.seccomp;
        let mem = &parts.vm.memory().clone();
        let kernel = boot::load_kernel(mem, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(path) => {
                let below_gap = config.memory_bytes().min(layout::MMIO_GAP_START);
                Some(boot::load_initrd(mem, path, kernel.kernel_end, below_gap)?)
            }
            None => None,
        };
        let mut cmdline = Cmdline::try_from(&config.cmdline, MAX_CMDLINE_LEN)
            .map_err(|e| BuildError::Boot(boot::BootError::CmdlineText(e)))?;
        let mut devices: Vec<Box<dyn VirtioDevice>> = vec![Box::new(Rng::new().map_err(BuildError::DeviceBackend)?)];
        for (i, d) in config.disks.iter().enumerate() {
            devices.push(Box::new(Block::new(&d.path, d.read_only, &format!("moat-disk{i}"))?));
        }
        if let Some(v) = &config.vsock {
            let max_connections = muxer::raise_fd_limit();
            devices.push(Box::new(Vsock::new(v.cid, Muxer::new(&v.uds_path, v.cid, max_connections)?)));
        }
        for d in fs_devices {
            devices.push(Box::new(d));
        }
        for device in devices {
            let announce = parts.add_virtio(device)?;
            cmdline.insert_str(&announce).map_err(|e| BuildError::Boot(boot::BootError::CmdlineText(e)))?;
        }
        boot::write_boot_params(mem, &kernel, &cmdline, initrd, config.memory_bytes())?;
        mptable::setup(mem, config.vcpus)?;
        parts.finish(kernel.entry)
    }
}

impl Microvm {
    /// A VM that runs `code` in 16-bit real mode from guest address 0x1000, with the
    /// same devices as a real one. For plumbing tests on any KVM (the PVM kind
    /// included), where booting Linux is not possible. Runs without seccomp, since
    /// `run` would confine the (test harness's) calling thread.
    pub fn with_test_code(code: &[u8], memory_mib: u32, serial: SerialSink) -> Result<Microvm, BuildError> {
        let parts = Parts::new(1, u64::from(memory_mib) << 20, memory::Backing { huge_pages: false, shared: false }, serial)?;
        let entry = GuestAddress(0x1000);
        parts.vm.memory().write_slice(code, entry).map_err(BuildError::TestCode)?;
        parts.finish(EntryPoint::Real16(entry))
    }
}

/// A VM with memory, interrupt controllers and devices, before its vCPUs exist.
struct Parts {
    vm: Vm,
    kvm: kvm_ioctls::Kvm,
    vcpus: u8,
    ctx: VcpuContext,
    mmio: Bus,
    virtio: Vec<VirtioSlot>,
    seccomp: bool,
    serial: SerialSink,
    ready: Arc<Mutex<Option<control::BootTimes>>>,
}

impl Parts {
    fn new(vcpus: u8, mem_bytes: u64, backing: memory::Backing, serial: SerialSink) -> Result<Parts, BuildError> {
        let started = crate::started();
        let kvm = vm::open_kvm()?;
        let max = kvm.get_max_vcpus();
        if usize::from(vcpus) > max {
            return Err(BuildError::TooManyVcpus { requested: vcpus, max });
        }
        let vm = Vm::new(&kvm, memory::create_guest_memory(mem_bytes, backing)?)?;
        let sink = Arc::new(StopSink::new().map_err(BuildError::EventFd)?);
        let exits = Arc::new(AtomicU64::new(0));

        let mut pio = Bus::new();
        let com1_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.register_irq(&com1_irq, serial::COM1_IRQ)?;
        let console = SerialConsole::new(com1_irq, serial.clone());
        pio.insert(serial::COM1_BASE, serial::COM1_LEN, Arc::new(Mutex::new(console)))?;
        pio.insert(i8042::I8042_BASE, i8042::I8042_LEN, Arc::new(Mutex::new(I8042::new(sink.clone()))))?;
        let control = ControlPort::new(started, exits.clone(), sink.clone());
        let ready = control.ready_slot();
        pio.insert(control::CONTROL_BASE, control::CONTROL_LEN, Arc::new(Mutex::new(control)))?;

        let ctx = VcpuContext { pio: Arc::new(pio), mmio: Arc::new(Bus::new()), sink, exits };
        Ok(Parts { vm, kvm, vcpus, ctx, mmio: Bus::new(), virtio: Vec::new(), seccomp: false, serial, ready })
    }

    /// Puts `device` on the next virtio-mmio slot: its window on the MMIO bus, its IRQ,
    /// an ioeventfd per queue (so a notification does not stop the vCPU in userspace).
    /// Returns the kernel command-line announcement for it.
    fn add_virtio(&mut self, mut device: Box<dyn VirtioDevice>) -> Result<String, BuildError> {
        let slot = self.virtio.len() as u64;
        let irq = layout::IRQ_VIRTIO_BASE + slot as u32;
        if irq > layout::IRQ_MAX {
            return Err(BuildError::TooManyDevices);
        }
        let base = layout::VIRTIO_MMIO_START + slot * layout::VIRTIO_MMIO_SIZE;
        let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        self.vm.register_irq(&irq_evt, irq)?;
        let num_queues = device.queue_max_sizes().len();
        let mut queue_evts = Vec::with_capacity(num_queues);
        for q in 0..num_queues {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
            let addr = IoEventAddress::Mmio(base + mmio::REG_QUEUE_NOTIFY);
            self.vm.fd().register_ioevent(&evt, &addr, q as u32).map_err(BuildError::Ioeventfd)?;
            queue_evts.push(evt);
        }
        // A vhost-user device keeps them for its backend; the main loop polls the rest.
        let queue_evts = device.take_queue_events(queue_evts);
        let transport = MmioTransport::new(device, self.vm.memory().clone(), Arc::new(IrqLine::new(irq_evt)));
        let transport = Arc::new(Mutex::new(transport));
        self.mmio.insert(base, layout::VIRTIO_MMIO_SIZE, transport.clone())?;
        self.virtio.push(VirtioSlot { transport, queue_evts });
        Ok(format!("virtio_mmio.device=4K@{base:#x}:{irq}"))
    }

    fn finish(mut self, entry: EntryPoint) -> Result<Microvm, BuildError> {
        self.ctx.mmio = Arc::new(std::mem::take(&mut self.mmio));
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| BuildError::Kvm(VmError::Setup("CPUID", e)))?;
        let vcpus = (0..self.vcpus)
            .map(|id| Vcpu::new(self.vm.fd(), self.vm.memory(), &supported, id, self.vcpus, entry, self.ctx.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Microvm {
            vm: self.vm,
            vcpus,
            ctx: self.ctx,
            virtio: self.virtio,
            seccomp: self.seccomp,
            serial: self.serial,
            ready: self.ready,
            started: crate::started(),
        })
    }
}
