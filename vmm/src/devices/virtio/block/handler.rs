//! virtio-blk request processing over plain guest memory and a backing file (no KVM
//! needed to test).
//!
//! A request is a 16-byte header (type, sector) in device-readable buffers, data in
//! readable (write requests) or writable (read requests) buffers, and a 1-byte status
//! at the very end of the writable part; any split between descriptors is accepted.
//! Every sector range is checked against the disk's capacity, so a guest can never
//! make the VMM read or write outside the backing file's first `capacity` sectors.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{ByteValued, GuestMemoryMmap};

use crate::devices::virtio::{next_chain, return_indirect, Avail, GuestFaults};

pub const SECTOR_SIZE: u64 = 512;
/// Largest data transfer per request; larger ones fail with IOERR. Linux's default
/// request limits stay well below this.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
pub const ID_BYTES: usize = 20;
/// Data segments per request the device accepts, advertised as `seg_max`
/// (VIRTIO_BLK_F_SEG_MAX). Linux sizes its requests by it.
pub const SEG_MAX: u32 = 128;
/// Descriptors per request: `SEG_MAX` data segments, the header's and the status's
/// (Linux's layout; `seg_max` counts data segments only). A longer chain is a guest
/// fault, answered IOERR without touching the disk.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct RequestHeader {
    pub type_: u32,
    pub reserved: u32,
    pub sector: u64,
}

// SAFETY: two u32 and a u64 in C layout: no padding, any byte pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// The disk behind the device.
pub struct Disk {
    pub file: File,
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub id: [u8; ID_BYTES],
}

/// Serves up to `max_chains` requests; returns (interrupt needed, more waiting). A
/// chain with an indirect descriptor is a guest fault, returned unused.
pub fn process_requests(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    disk: &Disk,
    faults: &mut GuestFaults,
    max_chains: usize,
) -> (bool, bool) {
    let mut used_any = false;
    for _ in 0..max_chains {
        let chain = match next_chain(queue, mem) {
            None => return (used_any && queue.needs_notification(mem).unwrap_or(true), false),
            Some(Avail::Chain(chain)) => chain,
            Some(Avail::Indirect(head)) => {
                if !return_indirect(queue, mem, head, faults) {
                    break;
                }
                used_any = true;
                continue;
            }
        };
        let head = chain.head_index();
        let written = serve(mem, chain, disk, faults);
        if queue.add_used(mem, head, written).is_err() {
            break;
        }
        used_any = true;
    }
    (used_any && queue.needs_notification(mem).unwrap_or(true), true)
}

/// Serves one request; returns the bytes written into guest buffers (used length).
/// A chain too malformed to carry a status byte is returned with length 0.
fn serve(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>, disk: &Disk, faults: &mut GuestFaults) -> u32 {
    let descriptors = chain.clone().take(MAX_DESCRIPTORS + 1).count();
    let (Ok(mut reader), Ok(mut writer)) = (chain.clone().reader(mem), chain.writer(mem)) else {
        return 0;
    };
    let writable = writer.available_bytes();
    if writable == 0 {
        return 0;
    }
    // The status byte is the last writable byte; what precedes it is data space.
    let Ok(mut status_w) = writer.split_at(writable - 1) else { return 0 };
    if descriptors > MAX_DESCRIPTORS {
        faults.record(&format_args!("a request has more than the {SEG_MAX} data segments offered"));
        return finish(&mut status_w, S_IOERR, 0);
    }
    let hdr: RequestHeader = match reader.read_obj() {
        Ok(h) => h,
        Err(_) => return finish(&mut status_w, S_IOERR, 0),
    };
    let (status, data_written) = match hdr.type_ {
        T_IN => read_sectors(disk, hdr.sector, &mut writer),
        T_OUT => write_sectors(disk, hdr.sector, &mut reader),
        T_FLUSH => (if disk.read_only || disk.file.sync_data().is_ok() { S_OK } else { S_IOERR }, 0),
        T_GET_ID => {
            let n = writer.available_bytes().min(ID_BYTES);
            match writer.write_all(&disk.id[..n]) {
                Ok(()) => (S_OK, n),
                Err(_) => (S_IOERR, 0),
            }
        }
        _ => (S_UNSUPP, 0),
    };
    finish(&mut status_w, status, data_written)
}

fn finish(status_w: &mut impl Write, status: u8, data_written: usize) -> u32 {
    match status_w.write_all(&[status]) {
        Ok(()) => (data_written + 1) as u32,
        Err(_) => data_written as u32,
    }
}

/// The byte range of `len` bytes at `sector`, if it lies inside the disk.
fn range(disk: &Disk, sector: u64, len: usize) -> Option<u64> {
    if !len.is_multiple_of(SECTOR_SIZE as usize) || len > MAX_REQUEST_BYTES {
        return None;
    }
    let sectors = len as u64 / SECTOR_SIZE;
    let end = sector.checked_add(sectors)?;
    (end <= disk.capacity_sectors).then(|| sector * SECTOR_SIZE)
}

fn read_sectors(disk: &Disk, sector: u64, writer: &mut impl WriterLike) -> (u8, usize) {
    let len = writer.available();
    let Some(offset) = range(disk, sector, len) else { return (S_IOERR, 0) };
    let mut buf = vec![0u8; len];
    if disk.file.read_exact_at(&mut buf, offset).is_err() {
        return (S_IOERR, 0);
    }
    match writer.put(&buf) {
        Ok(()) => (S_OK, len),
        Err(_) => (S_IOERR, 0),
    }
}

fn write_sectors(disk: &Disk, sector: u64, reader: &mut impl Read) -> (u8, usize) {
    if disk.read_only {
        return (S_IOERR, 0);
    }
    let mut buf = Vec::new();
    if reader.take(MAX_REQUEST_BYTES as u64 + 1).read_to_end(&mut buf).is_err() {
        return (S_IOERR, 0);
    }
    let Some(offset) = range(disk, sector, buf.len()) else { return (S_IOERR, 0) };
    match disk.file.write_all_at(&buf, offset) {
        Ok(()) => (S_OK, 0),
        Err(_) => (S_IOERR, 0),
    }
}

/// The data part of a read request's writable buffers.
trait WriterLike {
    fn available(&self) -> usize;
    fn put(&mut self, data: &[u8]) -> std::io::Result<()>;
}

impl<B: vm_memory::bitmap::BitmapSlice> WriterLike for virtio_queue::Writer<'_, B> {
    fn available(&self) -> usize {
        self.available_bytes()
    }
    fn put(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.write_all(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("mem")
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    fn disk(read_only: bool) -> (Disk, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "moat-blk-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut data = vec![0u8; 8 * 512];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 512) as u8 + 1;
        }
        std::fs::write(&path, &data).expect("disk file");
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open");
        (Disk { file, capacity_sectors: 8, read_only, id: *b"moat-test-disk\0\0\0\0\0\0" }, path)
    }

    fn header(m: &GuestMemoryMmap, at: u64, type_: u32, sector: u64) {
        m.write_obj(RequestHeader { type_, reserved: 0, sector }, GuestAddress(at)).expect("hdr");
    }

    fn run(m: &GuestMemoryMmap, descs: &[RawDescriptor], d: &Disk) -> u32 {
        let vq = MockSplitQueue::new(m, 16);
        vq.add_desc_chains(descs, 0).expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        process_requests(&mut q, m, d, &mut GuestFaults::new("test"), 16);
        m.read_obj::<u32>(GuestAddress(vq.used_addr().0 + 4 + 4)).expect("used len")
    }

    fn status(m: &GuestMemoryMmap, at: u64) -> u8 {
        m.read_obj(GuestAddress(at)).expect("status")
    }

    #[test]
    fn read_split_across_buffers() {
        let m = mem();
        let (d, path) = disk(false);
        header(&m, 0x10_0000, T_IN, 2);
        // Header in two pieces, data in two pieces, status alone.
        let descs = [
            desc(0x10_0000, 8, F_NEXT, 1),
            desc(0x10_0008, 8, F_NEXT, 2),
            desc(0x20_0000, 300, F_WRITE | F_NEXT, 3),
            desc(0x30_0000, 212, F_WRITE | F_NEXT, 4),
            desc(0x40_0000, 1, F_WRITE, 0),
        ];
        assert_eq!(run(&m, &descs, &d), 513);
        assert_eq!(status(&m, 0x40_0000), S_OK);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x20_0000)).expect("data"), 3, "sector 2 holds 3s");
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x30_0000 + 211)).expect("data"), 3);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn write_then_flush() {
        let m = mem();
        let (d, path) = disk(false);
        header(&m, 0x10_0000, T_OUT, 7);
        m.write_slice(&[0xee; 512], GuestAddress(0x20_0000)).expect("data");
        let descs = [desc(0x10_0000, 16, F_NEXT, 1), desc(0x20_0000, 512, F_NEXT, 2), desc(0x40_0000, 1, F_WRITE, 0)];
        assert_eq!(run(&m, &descs, &d), 1);
        assert_eq!(status(&m, 0x40_0000), S_OK);
        let on_disk = std::fs::read(&path).expect("read back");
        assert_eq!(&on_disk[7 * 512..], &[0xee; 512][..]);
        header(&m, 0x10_0000, T_FLUSH, 0);
        let descs = [desc(0x10_0000, 16, F_NEXT, 1), desc(0x40_0000, 1, F_WRITE, 0)];
        run(&m, &descs, &d);
        assert_eq!(status(&m, 0x40_0000), S_OK);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn out_of_range_and_read_only_are_errors_not_io() {
        let m = mem();
        let (d, path) = disk(false);
        for sector in [8, 7 + 1, u64::MAX, u64::MAX / 512] {
            header(&m, 0x10_0000, T_IN, sector);
            let descs = [desc(0x10_0000, 16, F_NEXT, 1), desc(0x20_0000, 1024, F_WRITE | F_NEXT, 2), desc(0x40_0000, 1, F_WRITE, 0)];
            run(&m, &descs, &d);
            assert_eq!(status(&m, 0x40_0000), S_IOERR, "sector {sector}");
        }
        // Not a whole number of sectors.
        header(&m, 0x10_0000, T_IN, 0);
        let descs = [desc(0x10_0000, 16, F_NEXT, 1), desc(0x20_0000, 100, F_WRITE | F_NEXT, 2), desc(0x40_0000, 1, F_WRITE, 0)];
        run(&m, &descs, &d);
        assert_eq!(status(&m, 0x40_0000), S_IOERR);
        let _ = std::fs::remove_file(path);

        let (ro, path) = disk(true);
        header(&m, 0x10_0000, T_OUT, 0);
        let descs = [desc(0x10_0000, 16, F_NEXT, 1), desc(0x20_0000, 512, F_NEXT, 2), desc(0x40_0000, 1, F_WRITE, 0)];
        run(&m, &descs, &ro);
        assert_eq!(status(&m, 0x40_0000), S_IOERR);
        assert_eq!(std::fs::read(&path).expect("read")[0], 1, "read-only disk unchanged");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn malformed_chains_do_not_crash() {
        let m = mem();
        let (d, path) = disk(false);
        // No writable byte at all: nothing can be reported, used length 0.
        header(&m, 0x10_0000, T_IN, 0);
        assert_eq!(run(&m, &[desc(0x10_0000, 16, 0, 0)], &d), 0);
        // Header too short: IOERR in the status byte.
        let descs = [desc(0x10_0000, 8, F_NEXT, 1), desc(0x40_0000, 1, F_WRITE, 0)];
        assert_eq!(run(&m, &descs, &d), 1);
        assert_eq!(status(&m, 0x40_0000), S_IOERR);
        // Unknown type: UNSUPP.
        header(&m, 0x10_0000, 77, 0);
        let descs = [desc(0x10_0000, 16, F_NEXT, 1), desc(0x40_0000, 1, F_WRITE, 0)];
        run(&m, &descs, &d);
        assert_eq!(status(&m, 0x40_0000), S_UNSUPP);
        // Buffer outside guest memory.
        header(&m, 0x10_0000, T_IN, 0);
        let descs = [desc(0x10_0000, 16, F_NEXT, 1), desc(0xfff0_0000, 512, F_WRITE | F_NEXT, 2), desc(0x40_0000, 1, F_WRITE, 0)];
        run(&m, &descs, &d);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn indirect_chains_are_refused() {
        let m = mem();
        let (d, path) = disk(false);
        header(&m, 0x10_0000, T_IN, 2);
        m.write_obj(0xffu8, GuestAddress(0x40_0000)).expect("status");
        // A whole read request in an indirect table (indices are the table's own).
        let table = [desc(0x10_0000, 16, F_NEXT, 1), desc(0x20_0000, 512, F_WRITE | F_NEXT, 2), desc(0x40_0000, 1, F_WRITE, 0)];
        for (i, t) in table.iter().enumerate() {
            m.write_obj(*t, GuestAddress(0x50_0000 + 16 * i as u64)).expect("indirect table");
        }
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(&[desc(0x50_0000, 48, F_INDIRECT, 0)], 0).expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut faults = GuestFaults::new("test");
        assert_eq!(process_requests(&mut q, &m, &d, &mut faults, 16), (true, false));
        assert_eq!(m.read_obj::<u32>(GuestAddress(vq.used_addr().0 + 4 + 4)).expect("used len"), 0, "returned unused");
        assert_eq!(status(&m, 0x40_0000), 0xff, "no status written");
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x20_0000)).expect("data"), 0, "no data read into it");
        assert_eq!(faults.count(), 1);
        let _ = std::fs::remove_file(path);
    }

    /// A read of the whole disk (8 sectors) into `segments` data buffers: all but the
    /// last 8 bytes long, the last taking the rest. Returns (status, first data byte,
    /// faults counted).
    fn read_in_segments(segments: u16) -> (u8, u8, u64) {
        let m = mem();
        let (d, path) = disk(false);
        header(&m, 0x10_0000, T_IN, 0);
        m.write_obj(0xffu8, GuestAddress(0x40_0000)).expect("status");
        let mut descs = vec![desc(0x10_0000, 16, F_NEXT, 1)];
        for i in 0..segments {
            let len = if i + 1 == segments { 4096 - 8 * (u32::from(segments) - 1) } else { 8 };
            descs.push(desc(0x20_0000 + 0x1000 * u64::from(i), len, F_WRITE | F_NEXT, i + 2));
        }
        descs.push(desc(0x40_0000, 1, F_WRITE, 0));
        let vq = MockSplitQueue::new(&m, 256);
        vq.add_desc_chains(&descs, 0).expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        let mut faults = GuestFaults::new("test");
        process_requests(&mut q, &m, &d, &mut faults, 16);
        let _ = std::fs::remove_file(path);
        (status(&m, 0x40_0000), m.read_obj(GuestAddress(0x20_0000)).expect("data"), faults.count())
    }

    #[test]
    fn seg_max_is_enforced() {
        assert_eq!(read_in_segments(SEG_MAX as u16), (S_OK, 1, 0), "seg_max segments are served");
        assert_eq!(read_in_segments(SEG_MAX as u16 + 1), (S_IOERR, 0, 1), "one more is a fault, the disk untouched");
    }

    #[test]
    fn get_id() {
        let m = mem();
        let (d, path) = disk(true);
        header(&m, 0x10_0000, T_GET_ID, 0);
        let descs = [desc(0x10_0000, 16, F_NEXT, 1), desc(0x20_0000, 20, F_WRITE | F_NEXT, 2), desc(0x40_0000, 1, F_WRITE, 0)];
        assert_eq!(run(&m, &descs, &d), 21);
        let mut id = [0u8; 14];
        m.read_slice(&mut id, GuestAddress(0x20_0000)).expect("id");
        assert_eq!(&id, b"moat-test-disk");
        let _ = std::fs::remove_file(path);
    }
}
