#!/usr/bin/env python3
"""Writes the seed corpus of the VMM's fuzz targets (seeds/<target>/<name>), in the
byte formats their doc comments describe: a few valid requests and a few hostile
ones, so the fuzzer starts from inputs that reach deep into the device code.

Run it after changing a target's input format; the seeds are committed."""
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_BASE = 0x1_0000
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


def u8(v): return struct.pack("<B", v)
def u16(v): return struct.pack("<H", v)
def u32(v): return struct.pack("<I", v)
def u64(v): return struct.pack("<Q", v)


def raw_desc(addr, length, flags, nxt, raw=False):
    """A RawDesc: flags_sel u8, addr u32, len u32, flags u16, next u16."""
    return u8(1 if raw else 0) + u32(addr) + u32(length) + u16(flags) + u16(nxt)


# --- vsock_tx ---------------------------------------------------------------------

def vsock_hdr(op, src_port, dst_port, length=0, flags=0, buf_alloc=256 * 1024, fwd_cnt=0, src_cid=3, dst_cid=2):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, length, 1, op, flags, buf_alloc, fwd_cnt)


OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7


def tx_packet(hdr, payload=b"", splits=()):
    return u8(0) + hdr + u16(len(payload)) + payload + u8(len(splits)) + b"".join(u16(s) for s in splits)


def rx_buffers(count, length):
    return u8(2) + u8(count) + u16(length)


def kick(q):
    return u8(4) + u8(q)


def host_dial(line):
    return u8(5) + u8(len(line)) + line


def host_round(flags):
    return u8(6) + u8(flags)


def vsock_seeds():
    tx, rx = 1, 0
    yield "request-to-listener", (rx_buffers(16, 4096) + tx_packet(vsock_hdr(OP_REQUEST, 5000, 1024)) + kick(tx)
                                  + tx_packet(vsock_hdr(OP_RW, 5000, 1024, 5), b"hello") + kick(tx) + kick(rx))
    yield "request-nobody-listens", rx_buffers(4, 256) + tx_packet(vsock_hdr(OP_REQUEST, 5001, 7)) + kick(tx)
    # Linux before 6.1.63: header and payload in separate descriptors; here cut anywhere.
    yield "rw-split-anywhere", (rx_buffers(8, 4096) + tx_packet(vsock_hdr(OP_REQUEST, 5002, 1024)) + kick(tx)
                                + tx_packet(vsock_hdr(OP_RW, 5002, 1024, 9), b"split rw!", (10, 34, 2)) + kick(tx))
    yield "rw-len-lies", tx_packet(vsock_hdr(OP_RW, 5003, 1024, 65536 + 1), b"x") + kick(tx)
    yield "wrong-cid-and-type", tx_packet(vsock_hdr(OP_REQUEST, 5004, 1024, src_cid=9)) + rx_buffers(2, 64) + kick(tx)
    yield "shutdown-and-credit", (rx_buffers(16, 512) + tx_packet(vsock_hdr(OP_REQUEST, 5005, 1024)) + kick(tx)
                                  + tx_packet(vsock_hdr(OP_CREDIT_REQUEST, 5005, 1024)) + kick(tx)
                                  + tx_packet(vsock_hdr(OP_SHUTDOWN, 5005, 1024, flags=3)) + kick(tx) + kick(rx))
    yield "host-dials-guest-answers", (rx_buffers(16, 4096) + host_dial(b"CONNECT 1024\n") + host_round(0) + kick(rx)
                                       + tx_packet(vsock_hdr(OP_RESPONSE, 1024, 1 << 30)) + kick(tx) + host_round(2))
    yield "host-dial-garbage", host_dial(b"CONNECT x\n") + host_dial(b"C" * 40) + host_round(1)
    # A REQUEST behind an indirect table, and a descriptor loop.
    yield "indirect-and-loop", (u8(1) + u8(0) + raw_desc(0x2000, 16, F_INDIRECT, 0)
                                + u8(1) + u8(1) + raw_desc(0, 44, F_NEXT, 1) + raw_desc(44, 44, F_NEXT, 0) + kick(tx))
    yield "tiny-rx-buffers", rx_buffers(16, 40) + tx_packet(vsock_hdr(OP_REQUEST, 5006, 7)) + kick(tx) + kick(rx)


# --- blk ----------------------------------------------------------------------------

T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8


def blk_request(type_, sector, data, descs):
    """descs: (writable, len) pairs covering header + data, status last."""
    out = u8(0) + u32(type_) + u64(sector) + u16(len(data)) + data + u8(len(descs) - 1)
    for writable, length in descs:
        out += u8(1 if writable else 0) + u32(length)
    return out


def blk_seeds():
    mode = lambda ro=False, qsize_log=4: u8((1 if ro else 0) | ((qsize_log - 1) << 1))
    kick = u8(2)
    yield "read-split", mode() + blk_request(T_IN, 2, b"", [(0, 8), (0, 8), (1, 300), (1, 212), (1, 1)]) + kick
    yield "write-then-flush", (mode() + blk_request(T_OUT, 7, b"\xee" * 512, [(0, 16), (0, 512), (1, 1)])
                               + blk_request(T_FLUSH, 0, b"", [(0, 16), (1, 1)]) + kick)
    yield "get-id", mode() + blk_request(T_GET_ID, 0, b"", [(0, 16), (1, 20), (1, 1)]) + kick
    yield "out-of-range", mode() + blk_request(T_IN, 8, b"", [(0, 16), (1, 1024), (1, 1)]) + kick
    yield "read-only-write", mode(ro=True) + blk_request(T_OUT, 0, b"\x11" * 512, [(0, 16), (0, 512), (1, 1)]) + kick
    yield "header-too-short", mode() + blk_request(T_IN, 0, b"", [(0, 8), (1, 1)]) + kick
    # seg_max (128) data segments are served; one more is a guest fault.
    segs = [(0, 16)] + [(1, 8)] * 127 + [(1, 4096 - 8 * 127), (1, 1)]
    yield "seg-max", mode(qsize_log=8) + blk_request(T_IN, 0, b"", segs) + kick
    segs = [(0, 16)] + [(1, 8)] * 128 + [(1, 4096 - 8 * 128), (1, 1)]
    yield "seg-max-plus-one", mode(qsize_log=8) + blk_request(T_IN, 0, b"", segs) + kick
    yield "indirect", mode() + u8(1) + u8(0) + raw_desc(DATA_BASE, 48, F_INDIRECT, 0) + kick


# --- mmio ---------------------------------------------------------------------------

def mmio_seeds():
    def w(off, v, width=2):  # width code 2 = 4 bytes
        return u8(0) + u16(off) + u8(width) + u64(v)

    def r(off, width=2):
        return u8(1) + u16(off) + u8(width)

    def mem(addr, data):
        out = b""
        for i in range(0, len(data), 255):
            chunk = data[i:i + 255]
            out += u8(2) + u32(addr + i) + u8(len(chunk)) + chunk
        return out

    def handshake(nqueues):
        out = w(0x70, 1) + w(0x70, 3) + w(0x024, 1) + w(0x020, 1) + w(0x70, 11)
        for q in range(nqueues):
            base = q * 0x4000
            out += w(0x030, q) + w(0x038, 16) + w(0x080, base) + w(0x090, base + 0x1000) + w(0x0a0, base + 0x2000)
            out += w(0x044, 1)
        return out + w(0x70, 15)

    def desc(addr, length, flags, nxt):
        return struct.pack("<QIHH", addr, length, flags, nxt)

    # virtio-blk: handshake, then a read request in memory and a notification.
    req = desc(DATA_BASE, 16, F_NEXT, 1) + desc(DATA_BASE + 0x1000, 512, F_WRITE | F_NEXT, 2) + desc(DATA_BASE + 0x2000, 1, F_WRITE, 0)
    blk = (u8(0) + handshake(1) + mem(0, req) + mem(DATA_BASE, u32(0) + u32(0) + u64(1))
           + mem(0x1000, u16(0) + u16(1) + u16(0)) + w(0x050, 0) + r(0x060) + w(0x064, 1) + r(0x100) + r(0x108, 3))
    yield "blk-handshake-read", blk
    yield "blk-reset", u8(0) + handshake(1) + w(0x70, 0) + r(0x70) + r(0x044)
    yield "vsock-handshake", u8(1) + handshake(3) + r(0x100, 3) + u8(3) + u8(1)
    rng = (u8(2) + handshake(1) + mem(0, desc(DATA_BASE, 64, F_WRITE, 0)) + mem(0x1000, u16(0) + u16(1) + u16(0)) + u8(3) + u8(0))
    yield "rng-handshake-fill", rng
    # Features not offered, queue setup after DRIVER_OK, odd widths and offsets.
    yield "hostile-order", (u8(0) + w(0x70, 15) + w(0x024, 1) + w(0x020, 0xffffffff) + w(0x70, 11) + w(0x038, 3)
                            + w(0x71, 1, 0) + r(0x72, 1) + w(0x7fc, 1) + r(0x1004, 3) + w(0x030, 99) + r(0x034))


def main():
    for target, seeds in (("vsock_tx", vsock_seeds), ("blk", blk_seeds), ("mmio", mmio_seeds)):
        d = os.path.join(HERE, target)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
