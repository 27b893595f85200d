//! The host's hybrid-vsock dial (`CONNECT <port>\n` -> `OK <n>\n`) against a VMM
//! socket that answers with arbitrary bytes and hangs up.
//!
//! Input: the bytes the socket answers with.
//!
//! Checked: no panic or hang; the dial succeeds exactly when the first line (within
//! the 32-byte limit) is `OK ` and digits, and the stream then yields exactly the bytes
//! after that line; the request sent was `CONNECT 1024\n`.
#![no_main]

use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use moat_shim::vsock::dial;

/// The longest reply line `dial` reads, newline included.
const MAX_REPLY: usize = 32;

fn accepted(reply: &[u8]) -> Option<&[u8]> {
    let nl = reply.iter().take(MAX_REPLY).position(|&b| b == b'\n')?;
    let digits = reply[..nl].strip_prefix(b"OK ")?;
    (!digits.is_empty() && digits.iter().all(u8::is_ascii_digit)).then(|| &reply[nl + 1..])
}

fn run(reply: &[u8]) {
    let dir = tempfile::Builder::new().prefix("moat-fuzz-").tempdir().expect("a temporary directory");
    let path = dir.path().join("v.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let answer = reply.to_vec();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        let mut line = String::new();
        std::io::BufReader::new(&s).read_line(&mut line).expect("request line");
        let _ = (&s).write_all(&answer);
        line
    });
    let result = dial(&path, 1024, Duration::from_secs(5));
    assert_eq!(server.join().expect("server"), "CONNECT 1024\n");
    match (result, accepted(reply)) {
        (Ok(mut s), Some(rest)) => {
            let mut got = Vec::new();
            s.read_to_end(&mut got).expect("the stream after the handshake");
            assert_eq!(got, rest, "bytes after the handshake line were lost or invented");
        }
        (Err(e), None) => {
            let msg = e.to_string();
            assert!(!msg.chars().any(char::is_control), "control characters in an error: {msg:?}");
        }
        (Ok(_), None) => panic!("a dial succeeded on reply {reply:?}"),
        (Err(e), Some(_)) => panic!("a dial failed on the valid reply {reply:?}: {e}"),
    }
}

fuzz_target!(|data: &[u8]| run(data));
