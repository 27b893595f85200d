//! The vhost-user frontend side of one connection: what the VMM tells a backend so it
//! can serve a device's queues itself, over rust-vmm's `vhost` crate (which encodes
//! the messages and checks every reply's request code, reply flag and size).
//!
//! The order follows the vhost-user specification: at connect, SET_OWNER,
//! GET_FEATURES and (if offered) GET/SET_PROTOCOL_FEATURES, keeping only REPLY_ACK;
//! at each activation, SET_FEATURES, SET_MEM_TABLE with the guest RAM memfd, and per
//! queue SET_VRING_NUM/BASE/ADDR/KICK/CALL/ERR, then SET_VRING_ENABLE; at a device
//! reset, GET_VRING_BASE per queue, which makes the backend stop using the rings.
//!
//! Every call blocks on the backend's reply, bounded by socket timeouts: a backend
//! that hangs costs the device, never the VMM.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::VIRTIO_F_VERSION_1;

/// Transport feature bit: the backend speaks the protocol-feature extension.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// How long one request may wait on the backend. virtiofsd answers GET_VRING_BASE
/// only once its queue threads have finished the requests in flight, so this is
/// generous; past it the backend counts as dead.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("vhost-user socket {0} is not usable")]
    Socket(PathBuf, #[source] std::io::Error),
    #[error("vhost-user socket {0} is not a Unix socket")]
    NotASocket(PathBuf),
    #[error("cannot connect to the vhost-user backend at {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    #[error("the vhost-user backend does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    #[error("vhost-user {0} failed")]
    Request(&'static str, #[source] vhost::Error),
    #[error("guest memory is not backed by a file a backend could map")]
    NotShared,
    #[error("{0} vhost-user memory regions; the protocol carries at most 8")]
    TooManyRegions(usize),
}

/// Where a queue's rings are, in the VMM's address space (what vhost-user wants),
/// and where the backend should resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    pub max_size: u16,
    pub size: u16,
    pub next_avail: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// The eventfds of one queue: the guest's notifications (`kick`, signalled by KVM),
/// the backend's interrupts (`call`) and errors (`err`), both read by the VMM.
pub struct QueueFds<'a> {
    pub kick: &'a EventFd,
    pub call: &'a EventFd,
    pub err: &'a EventFd,
}

/// A connected, negotiated backend.
pub struct Backend {
    frontend: Frontend,
    features: u64,
    /// Protocol features both sides agreed on (only REPLY_ACK is ever asked for).
    protocol: VhostUserProtocolFeatures,
}

fn req(what: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |e| VhostUserError::Request(what, e)
}

impl Backend {
    /// Connects to the backend listening at `path` and negotiates the session.
    pub fn connect(path: &Path, max_queues: u64) -> Result<Backend, VhostUserError> {
        let meta = std::fs::metadata(path).map_err(|e| VhostUserError::Socket(path.to_path_buf(), e))?;
        if !meta.file_type().is_socket() {
            return Err(VhostUserError::NotASocket(path.to_path_buf()));
        }
        let stream = UnixStream::connect(path).map_err(|e| VhostUserError::Connect(path.to_path_buf(), e))?;
        Backend::from_stream(stream, max_queues).map_err(|e| match e {
            VhostUserError::Request(what, source) => {
                VhostUserError::Connect(path.to_path_buf(), std::io::Error::other(format!("{what}: {source}")))
            }
            other => other,
        })
    }

    /// Negotiates over an already connected stream.
    pub fn from_stream(stream: UnixStream, max_queues: u64) -> Result<Backend, VhostUserError> {
        let timeouts = stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)));
        timeouts.map_err(|e| VhostUserError::Request("socket setup", vhost::Error::IOError(e)))?;
        let mut frontend = Frontend::from_stream(stream, max_queues);
        frontend.set_owner().map_err(req("SET_OWNER"))?;
        let features = frontend.get_features().map_err(req("GET_FEATURES"))?;
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(VhostUserError::NoVersion1(features));
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if features & (1 << VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
            let offered = frontend.get_protocol_features().map_err(req("GET_PROTOCOL_FEATURES"))?;
            protocol = offered & VhostUserProtocolFeatures::REPLY_ACK;
            frontend.set_protocol_features(protocol).map_err(req("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every request is then acknowledged, so a refused one is noticed
                // where it happens rather than as a silent device later.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        Ok(Backend { frontend, features, protocol })
    }

    /// The virtio feature bits the backend offers (vhost-user transport bits included).
    pub fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features_on(&self) -> bool {
        self.features & (1 << VHOST_USER_F_PROTOCOL_FEATURES) != 0
    }

    /// Hands the queues to the backend: features the driver accepted, guest memory,
    /// then each ring and its eventfds; the rings are enabled last.
    pub fn start(
        &mut self,
        acked: u64,
        mem: &GuestMemoryMmap,
        rings: &[Ring],
        fds: &[QueueFds<'_>],
    ) -> Result<(), VhostUserError> {
        let mut features = acked;
        if self.protocol_features_on() {
            features |= 1 << VHOST_USER_F_PROTOCOL_FEATURES;
        }
        self.frontend.set_features(features).map_err(req("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| VhostUserError::NotShared))
            .collect::<Result<Vec<_>, _>>()?;
        if regions.len() > 8 {
            return Err(VhostUserError::TooManyRegions(regions.len()));
        }
        self.frontend.set_mem_table(&regions).map_err(req("SET_MEM_TABLE"))?;
        for (i, (ring, fd)) in rings.iter().zip(fds).enumerate() {
            self.frontend.set_vring_num(i, ring.size).map_err(req("SET_VRING_NUM"))?;
            self.frontend.set_vring_base(i, ring.next_avail).map_err(req("SET_VRING_BASE"))?;
            let addr = VringConfigData {
                queue_max_size: ring.max_size,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: ring.desc,
                used_ring_addr: ring.used,
                avail_ring_addr: ring.avail,
                log_addr: None,
            };
            self.frontend.set_vring_addr(i, &addr).map_err(req("SET_VRING_ADDR"))?;
            self.frontend.set_vring_kick(i, fd.kick).map_err(req("SET_VRING_KICK"))?;
            self.frontend.set_vring_call(i, fd.call).map_err(req("SET_VRING_CALL"))?;
            self.frontend.set_vring_err(i, fd.err).map_err(req("SET_VRING_ERR"))?;
        }
        // With protocol features the rings start disabled; without, they start on
        // the first kick.
        if self.protocol_features_on() {
            for i in 0..rings.len() {
                self.frontend.set_vring_enable(i, true).map_err(req("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops the backend's use of `queues` rings (GET_VRING_BASE), as a device reset
    /// requires before the guest may reuse that memory.
    pub fn stop(&mut self, queues: usize) -> Result<(), VhostUserError> {
        for i in 0..queues {
            self.frontend.get_vring_base(i).map_err(req("GET_VRING_BASE"))?;
        }
        Ok(())
    }

    /// Whether REPLY_ACK was agreed (for tests and logs).
    pub fn reply_ack(&self) -> bool {
        self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK)
    }
}

impl AsRawFd for Backend {
    fn as_raw_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    const GET_FEATURES: u32 = 1;
    const SET_FEATURES: u32 = 2;
    const SET_OWNER: u32 = 3;
    const GET_PROTOCOL_FEATURES: u32 = 15;
    const SET_PROTOCOL_FEATURES: u32 = 16;
    const GET_VRING_BASE: u32 = 11;
    const REPLY: u32 = 0x4;
    const NEED_REPLY: u32 = 0x8;

    /// The far end of a socketpair, speaking raw vhost-user bytes.
    struct FakeBackend(UnixStream);

    impl FakeBackend {
        /// Reads one request: (code, flags, payload).
        fn recv(&mut self) -> (u32, u32, Vec<u8>) {
            let mut hdr = [0u8; 12];
            self.0.read_exact(&mut hdr).expect("request header");
            let word = |i: usize| u32::from_le_bytes(hdr[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
            let mut body = vec![0u8; word(2) as usize];
            self.0.read_exact(&mut body).expect("request body");
            (word(0), word(1), body)
        }
        fn send_raw(&mut self, code: u32, flags: u32, size: u32, body: &[u8]) {
            let mut m = Vec::new();
            for w in [code, flags, size] {
                m.extend_from_slice(&w.to_le_bytes());
            }
            m.extend_from_slice(body);
            self.0.write_all(&m).expect("reply");
        }
        fn reply_u64(&mut self, code: u32, v: u64) {
            self.send_raw(code, 1 | REPLY, 8, &v.to_le_bytes());
        }
        /// Serves the connect-time negotiation up to the protocol features.
        fn negotiate(&mut self, features: u64, protocol: u64) {
            assert_eq!(self.recv().0, SET_OWNER);
            assert_eq!(self.recv().0, GET_FEATURES);
            self.reply_u64(GET_FEATURES, features);
            if features & (1 << VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
                assert_eq!(self.recv().0, GET_PROTOCOL_FEATURES);
                self.reply_u64(GET_PROTOCOL_FEATURES, protocol);
                let (code, _, body) = self.recv();
                assert_eq!(code, SET_PROTOCOL_FEATURES);
                assert_eq!(body, (protocol & 0x8).to_le_bytes(), "only REPLY_ACK is taken");
            }
        }
    }

    const V1: u64 = 1 << VIRTIO_F_VERSION_1;
    const PF: u64 = 1 << VHOST_USER_F_PROTOCOL_FEATURES;

    /// Negotiates against a fake backend thread driven by `backend`; the caller joins
    /// the thread once it has made the requests the fake expects.
    fn with_fake(
        backend: impl FnOnce(FakeBackend) + Send + 'static,
    ) -> (Result<Backend, VhostUserError>, std::thread::JoinHandle<()>) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let t = std::thread::spawn(move || backend(FakeBackend(b)));
        (Backend::from_stream(a, 2), t)
    }

    #[test]
    fn negotiation_keeps_only_reply_ack_and_acks_requests() {
        let (r, t) = with_fake(|mut f| {
            f.negotiate(V1 | PF | (1 << 29), 0xffff);
            // After REPLY_ACK, a plain request asks for an ack.
            let (code, flags, body) = f.recv();
            assert_eq!((code, flags & NEED_REPLY), (SET_FEATURES, NEED_REPLY));
            assert_eq!(body, (V1 | PF).to_le_bytes());
            f.reply_u64(SET_FEATURES, 0);
            let (code, _, body) = f.recv();
            assert_eq!((code, body), (GET_VRING_BASE, vec![1, 0, 0, 0, 0, 0, 0, 0]));
            f.send_raw(GET_VRING_BASE, 1 | REPLY, 8, &[1, 0, 0, 0, 7, 0, 0, 0]);
        });
        let b = r.expect("negotiated");
        assert!(b.reply_ack());
        assert_eq!(b.features(), V1 | PF | (1 << 29));
        b.frontend.set_features(V1 | PF).expect("acked");
        assert_eq!(b.frontend.get_vring_base(1).expect("vring base"), 7);
        t.join().expect("fake backend");
    }

    #[test]
    fn backend_without_version_1_is_refused() {
        let (r, t) = with_fake(|mut f| f.negotiate(1 << 28, 0));
        assert!(matches!(r, Err(VhostUserError::NoVersion1(_))));
        t.join().expect("fake backend");
    }

    #[test]
    fn malformed_replies_are_errors() {
        // Each case: what the fake backend answers to GET_FEATURES.
        type Answer = Box<dyn FnOnce(&mut FakeBackend) + Send>;
        let cases: Vec<(&str, Answer)> = vec![
            ("wrong request code", Box::new(|f| f.reply_u64(SET_OWNER, V1))),
            ("reply flag missing", Box::new(|f| f.send_raw(GET_FEATURES, 1, 8, &V1.to_le_bytes()))),
            ("wrong version", Box::new(|f| f.send_raw(GET_FEATURES, 2 | REPLY, 8, &V1.to_le_bytes()))),
            ("reserved flag bits", Box::new(|f| f.send_raw(GET_FEATURES, 0x101 | REPLY, 8, &V1.to_le_bytes()))),
            ("short body then EOF", Box::new(|f| f.send_raw(GET_FEATURES, 1 | REPLY, 8, &[1, 2, 3]))),
            ("header only then EOF", Box::new(|f| f.send_raw(GET_FEATURES, 1 | REPLY, 0, &[]))),
            ("unknown request code", Box::new(|f| f.reply_u64(0xdead, V1))),
            ("oversized claim", Box::new(|f| f.send_raw(GET_FEATURES, 1 | REPLY, u32::MAX, &V1.to_le_bytes()))),
            ("nothing at all", Box::new(|_| {})),
        ];
        for (what, answer) in cases {
            let (r, t) = with_fake(move |mut f| {
                assert_eq!(f.recv().0, SET_OWNER);
                assert_eq!(f.recv().0, GET_FEATURES);
                answer(&mut f);
                // Dropping the stream closes it: nothing more comes.
            });
            assert!(matches!(r, Err(VhostUserError::Request("GET_FEATURES", _))), "{what}: {:?}", r.err());
            t.join().expect("fake backend");
        }
    }

    #[test]
    fn refused_ack_is_an_error() {
        let (r, t) = with_fake(|mut f| {
            f.negotiate(V1 | PF, 0x8);
            f.recv();
            f.reply_u64(SET_FEATURES, 1); // non-zero: the backend failed the request
        });
        let b = r.expect("negotiated");
        assert!(b.frontend.set_features(V1).is_err());
        t.join().expect("fake backend");
    }

    #[test]
    fn connect_names_the_path() {
        let e = Backend::connect(Path::new("/nonexistent/fs.sock"), 2).err().expect("missing socket");
        assert_eq!(e.to_string(), "vhost-user socket /nonexistent/fs.sock is not usable");
        let e = Backend::connect(Path::new("/"), 2).err().expect("not a socket");
        assert_eq!(e.to_string(), "vhost-user socket / is not a Unix socket");
        // A socket file nobody listens on any more.
        let dir = std::env::temp_dir().join(format!("moat-vu-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        let e = Backend::connect(&path, 2).err().expect("dead socket");
        assert!(matches!(e, VhostUserError::Connect(..)), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn start_needs_shared_memory() {
        let (r, t) = with_fake(|mut f| {
            f.negotiate(V1, 0);
            f.recv(); // SET_FEATURES, no ack without REPLY_ACK
        });
        let mut b = r.expect("negotiated");
        let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).expect("mem");
        assert!(matches!(b.start(V1, &mem, &[], &[]), Err(VhostUserError::NotShared)));
        t.join().expect("fake backend");
    }
}
