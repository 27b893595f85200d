//! virtio-vsock packets (virtio 1.2, section 5.10.6): a 44-byte header and, for RW
//! packets, a payload, read from or written to descriptor chains of any shape.
//!
//! Guest kernels before 6.1.63 put the header and the payload in separate
//! descriptors; later ones put both in one. Reading through virtio-queue's `Reader`
//! and `Writer` walks whatever split the driver chose, and every size the guest
//! states is checked against what its buffers really hold.

use std::io::{Read, Write};

use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, GuestMemoryMmap};

/// Largest payload moat accepts or sends in one packet (Linux uses 64 KiB too).
pub const MAX_PAYLOAD: u32 = 64 * 1024;
pub const HEADER_LEN: usize = std::mem::size_of::<VsockHeader>();

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_hdr`, little endian on the wire (and on x86).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct VsockHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

// SAFETY: a packed struct of plain integers: no padding, and every byte pattern is a
// valid value, so it may be read from and written to guest memory as bytes.
unsafe impl ByteValued for VsockHeader {}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("descriptor chain is not usable: {0}")]
    Chain(String),
    #[error("chain holds {0} bytes, less than a vsock header")]
    ShortHeader(usize),
    #[error("payload length {0} exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
    #[error("header says {stated} payload bytes but the chain holds {present}")]
    Truncated { stated: u32, present: usize },
    #[error("buffer of {have} bytes cannot hold a {need}-byte packet")]
    NoRoom { have: usize, need: usize },
}

/// A packet the guest sent (from the TX queue).
#[derive(Debug, PartialEq, Eq)]
pub struct TxPacket {
    pub hdr: VsockHeader,
    pub payload: Vec<u8>,
}

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Reads one TX packet. The payload is only read for RW packets; other operations
/// carry none, whatever `len` says.
pub fn read_tx(mem: &GuestMemoryMmap, chain: Chain<'_>) -> Result<TxPacket, PacketError> {
    let mut reader = chain.reader(mem).map_err(|e| PacketError::Chain(e.to_string()))?;
    let available = reader.available_bytes();
    if available < HEADER_LEN {
        return Err(PacketError::ShortHeader(available));
    }
    let hdr: VsockHeader = reader.read_obj().map_err(|e| PacketError::Chain(e.to_string()))?;
    let len = hdr.len;
    if hdr.op != OP_RW {
        return Ok(TxPacket { hdr, payload: Vec::new() });
    }
    if len > MAX_PAYLOAD {
        return Err(PacketError::TooLong(len));
    }
    let present = reader.available_bytes();
    if present < len as usize {
        return Err(PacketError::Truncated { stated: len, present });
    }
    let mut payload = vec![0u8; len as usize];
    reader.read_exact(&mut payload).map_err(|e| PacketError::Chain(e.to_string()))?;
    Ok(TxPacket { hdr, payload })
}

/// Writes `hdr` and as much of `payload` as the chain holds after the header.
/// Returns (bytes written for the used ring, payload bytes written).
pub fn write_rx_partial(
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
    mut hdr: VsockHeader,
    payload: &[u8],
) -> Result<(u32, usize), PacketError> {
    let mut writer = chain.writer(mem).map_err(|e| PacketError::Chain(e.to_string()))?;
    let have = writer.available_bytes();
    let room = have.checked_sub(HEADER_LEN).ok_or(PacketError::NoRoom { have, need: HEADER_LEN })?;
    let n = payload.len().min(room).min(MAX_PAYLOAD as usize);
    hdr.len = n as u32;
    writer.write_obj(hdr).map_err(|e| PacketError::Chain(e.to_string()))?;
    writer.write_all(&payload[..n]).map_err(|e| PacketError::Chain(e.to_string()))?;
    Ok(((HEADER_LEN + n) as u32, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::{Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("mem")
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    fn rw_header(len: u32) -> VsockHeader {
        VsockHeader { src_cid: 3, dst_cid: 2, src_port: 1024, dst_port: 5000, len, type_: TYPE_STREAM, op: OP_RW, ..Default::default() }
    }

    /// Builds a queue holding one chain of `descs` and returns its first chain.
    fn with_chain<R>(m: &GuestMemoryMmap, descs: &[RawDescriptor], f: impl FnOnce(Chain<'_>) -> R) -> R {
        let vq = MockSplitQueue::new(m, 16);
        vq.add_desc_chains(descs, 0).expect("chain");
        let mut q: Queue = vq.create_queue().expect("queue");
        let chain = q.iter(m).expect("iter").next().expect("a chain");
        f(chain)
    }

    #[test]
    fn header_is_44_bytes() {
        assert_eq!(HEADER_LEN, 44);
    }

    #[test]
    fn tx_header_and_payload_in_one_descriptor() {
        let m = mem();
        m.write_obj(rw_header(5), GuestAddress(0x10_0000)).expect("hdr");
        m.write_slice(b"hello", GuestAddress(0x10_0000 + 44)).expect("payload");
        let p = with_chain(&m, &[desc(0x10_0000, 49, 0, 0)], |c| read_tx(&m, c)).expect("packet");
        assert_eq!(p.payload, b"hello");
        assert_eq!({ p.hdr.dst_port }, 5000);
    }

    #[test]
    fn tx_split_anywhere() {
        let m = mem();
        // Header split 10/34 across two descriptors, payload split 2/3 across two more.
        let hdr = rw_header(5);
        let bytes = hdr.as_slice().to_vec();
        m.write_slice(&bytes[..10], GuestAddress(0x10_0000)).expect("w");
        m.write_slice(&bytes[10..], GuestAddress(0x10_1000)).expect("w");
        m.write_slice(b"he", GuestAddress(0x10_2000)).expect("w");
        m.write_slice(b"llo", GuestAddress(0x10_3000)).expect("w");
        let descs = [
            desc(0x10_0000, 10, F_NEXT, 1),
            desc(0x10_1000, 34, F_NEXT, 2),
            desc(0x10_2000, 2, F_NEXT, 3),
            desc(0x10_3000, 3, 0, 0),
        ];
        let p = with_chain(&m, &descs, |c| read_tx(&m, c)).expect("packet");
        assert_eq!(p.payload, b"hello");
        assert_eq!(p.hdr, hdr);
    }

    #[test]
    fn tx_lies_are_refused() {
        let m = mem();
        m.write_obj(rw_header(100), GuestAddress(0x10_0000)).expect("hdr");
        let r = with_chain(&m, &[desc(0x10_0000, 60, 0, 0)], |c| read_tx(&m, c));
        assert_eq!(r, Err(PacketError::Truncated { stated: 100, present: 16 }));
        m.write_obj(rw_header(MAX_PAYLOAD + 1), GuestAddress(0x10_0000)).expect("hdr");
        let r = with_chain(&m, &[desc(0x10_0000, 60, 0, 0)], |c| read_tx(&m, c));
        assert_eq!(r, Err(PacketError::TooLong(MAX_PAYLOAD + 1)));
        let r = with_chain(&m, &[desc(0x10_0000, 20, 0, 0)], |c| read_tx(&m, c));
        assert_eq!(r, Err(PacketError::ShortHeader(20)));
        // A buffer outside guest memory is a chain error, not a crash.
        let r = with_chain(&m, &[desc(0xffff_0000, 60, 0, 0)], |c| read_tx(&m, c));
        assert!(matches!(r, Err(PacketError::Chain(_))), "{r:?}");
    }

    #[test]
    fn control_packets_ignore_len() {
        let m = mem();
        let hdr = VsockHeader { op: OP_REQUEST, len: 9999, ..rw_header(0) };
        m.write_obj(hdr, GuestAddress(0x10_0000)).expect("hdr");
        let p = with_chain(&m, &[desc(0x10_0000, 44, 0, 0)], |c| read_tx(&m, c)).expect("packet");
        assert!(p.payload.is_empty());
    }

    #[test]
    fn rx_write_across_split_buffers() {
        let m = mem();
        let descs = [desc(0x10_0000, 30, F_WRITE | F_NEXT, 1), desc(0x10_1000, 100, F_WRITE, 0)];
        let (used, n) = with_chain(&m, &descs, |c| write_rx_partial(&m, c, rw_header(0), b"payload")).expect("write");
        assert_eq!((used, n), (44 + 7, 7));
        let mut first = [0u8; 30];
        m.read_slice(&mut first, GuestAddress(0x10_0000)).expect("r");
        let mut rest = [0u8; 21];
        m.read_slice(&mut rest, GuestAddress(0x10_1000)).expect("r");
        let mut all = first.to_vec();
        all.extend_from_slice(&rest);
        let hdr = VsockHeader::from_slice(&all[..44]).copied().expect("hdr");
        assert_eq!({ hdr.len }, 7);
        assert_eq!(&all[44..], b"payload");
    }

    #[test]
    fn rx_partial_splits_a_big_payload() {
        let m = mem();
        let descs = [desc(0x10_0000, 44 + 4, F_WRITE, 0)];
        let (used, n) = with_chain(&m, &descs, |c| write_rx_partial(&m, c, rw_header(0), b"abcdefgh")).expect("write");
        assert_eq!((used, n), (48, 4));
        let hdr: VsockHeader = m.read_obj(GuestAddress(0x10_0000)).expect("hdr");
        assert_eq!({ hdr.len }, 4);
        let descs = [desc(0x10_0000, 43, F_WRITE, 0)];
        assert!(with_chain(&m, &descs, |c| write_rx_partial(&m, c, rw_header(0), b"x")).is_err());
    }

    #[test]
    fn rx_without_room_is_refused() {
        let m = mem();
        // Not even room for a header: refused, nothing written.
        let descs = [desc(0x10_0000, 40, F_WRITE, 0)];
        let r = with_chain(&m, &descs, |c| write_rx_partial(&m, c, rw_header(0), b"x"));
        assert_eq!(r, Err(PacketError::NoRoom { have: 40, need: 44 }));
        // Room for part of the payload: that part goes, the caller keeps the rest.
        let descs = [desc(0x10_0000, 50, F_WRITE, 0)];
        let r = with_chain(&m, &descs, |c| write_rx_partial(&m, c, rw_header(0), b"too long for it"));
        assert_eq!(r, Ok((50, 6)));
    }
}
