//! The shim's agent client against a hostile agent: each RPC the client makes gets an
//! arbitrary reply (raw bytes, a ttrpc frame around arbitrary bytes, a response with
//! an arbitrary payload, or an error status with an arbitrary message), then the agent
//! hangs up.
//!
//! Input: `call u8` (modulo 15: Version, CreateContainer, StartProcess, WaitProcess,
//! SignalProcess, ResizePty, CloseStdin, ExecProcess, Stats, ListPids, Pause, Resume,
//! Update, RemoveContainer, Shutdown), `mode u8` (modulo 4), then the rest:
//! - 0: the reply's bytes as they are (a frame's stream id is made the request's);
//! - 1: a response frame carrying the rest;
//! - 2: a ttrpc Response with status OK and the rest as the RPC's payload;
//! - 3: a ttrpc Response with status code `code u8` and the rest as its message.
//!
//! Checked: no panic or hang; what the client returns was validated (protocol and
//! short printable version strings, pids in 1..=2^22, exit statuses in 0..=255, at
//! most MAX_PIDS pids); every error message is one printable, bounded line.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use moat_protocol as proto;
use moat_shim::agent::{Agent, AgentError, ProcessId, MAX_PIDS};
use moat_shim_fuzz::Reader;
use protobuf::Message;

const HEADER: usize = 10;
const TYPE_RESPONSE: u8 = 2;

fn frame(stream_id: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&stream_id);
    f.extend_from_slice(&[TYPE_RESPONSE, 0]);
    f.extend_from_slice(body);
    f
}

fn response(status: Option<(i32, String)>, payload: &[u8]) -> Vec<u8> {
    let mut r = ttrpc::Response::new();
    if let Some((code, message)) = status {
        let mut s = ttrpc::Status::new();
        s.code = protobuf::EnumOrUnknown::from_i32(code);
        s.message = message;
        r.status = protobuf::MessageField::some(s);
    }
    r.payload = payload.to_vec();
    r.write_to_bytes().expect("a Response encodes")
}

/// An agent that reads one request and answers with what `reply` makes of its stream id.
fn fake_agent(reply: impl FnOnce([u8; 4]) -> Vec<u8> + Send + 'static) -> (Agent, std::thread::JoinHandle<()>) {
    let (ours, mut theirs) = UnixStream::pair().expect("socket pair");
    let t = std::thread::spawn(move || {
        let mut header = [0u8; HEADER];
        if theirs.read_exact(&mut header).is_err() {
            return;
        }
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let mut body = vec![0u8; len];
        let _ = theirs.read_exact(&mut body);
        let _ = theirs.write_all(&reply([header[4], header[5], header[6], header[7]]));
    });
    (Agent::new(ours).expect("client"), t)
}

fn check_error(e: &AgentError) {
    let msg = e.to_string();
    assert!(!msg.chars().any(char::is_control), "control characters in an error: {msg:?}");
    assert!(msg.chars().count() < 1024, "an error of {} characters", msg.chars().count());
}

fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let call = r.u8() % 15;
    let mode = r.u8() % 4;
    let code = if mode == 3 { i32::from(r.u8()) } else { 0 };
    let rest = r.rest().to_vec();
    let (agent, server) = fake_agent(move |id| match mode {
        0 => {
            let mut out = rest;
            if out.len() >= HEADER {
                out[4..8].copy_from_slice(&id);
            }
            out
        }
        1 => frame(id, &rest),
        2 => frame(id, &response(None, &rest)),
        _ => frame(id, &response(Some((code, String::from_utf8_lossy(&rest).into_owned())), &[])),
    });
    let p = ProcessId { container: "c1".into(), exec: String::new() };
    let result: Result<(), AgentError> = match call {
        0 => agent.version().map(|(v, k)| {
            for s in [v, k] {
                assert!(s.len() <= 128 && !s.chars().any(char::is_control), "accepted version string {s:?}");
            }
        }),
        1 => agent.create_container(&proto::CreateContainerRequest { container_id: "c1".into(), ..Default::default() }),
        2 => agent.start_process(&p).map(|pid| assert!((1..=1 << 22).contains(&pid), "accepted pid {pid}")),
        3 => agent.wait_process(&p).map(|s| assert!((0..=255).contains(&s), "accepted exit status {s}")),
        4 => agent.signal_process(&p, 15, false),
        5 => agent.resize_pty(&p, 80, 24),
        6 => agent.close_stdin(&p),
        7 => agent.exec_process(&proto::ExecProcessRequest { container_id: "c1".into(), exec_id: "e1".into(), ..Default::default() }),
        8 => agent.stats("c1").map(drop),
        9 => agent.list_pids("c1").map(|pids| {
            assert!(pids.len() <= MAX_PIDS, "accepted {} pids", pids.len());
            assert!(pids.iter().all(|p| (1..=1 << 22).contains(p)), "accepted a bad pid");
        }),
        10 => agent.pause("c1"),
        11 => agent.resume("c1"),
        12 => agent.update("c1", b"{}".to_vec()),
        13 => agent.remove_container("c1"),
        _ => agent.shutdown(Duration::from_secs(5)),
    };
    if let Err(e) = &result {
        check_error(e);
    }
    drop(agent);
    server.join().expect("fake agent");
}

fuzz_target!(|data: &[u8]| run(data));
