//! The host terminal of `moat run -t`: raw mode while the run lasts (restored on
//! drop) and its window size.

use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};

/// Puts a terminal in raw mode; dropping it restores the saved settings.
pub struct RawMode {
    fd: std::os::fd::OwnedFd,
    saved: Termios,
}

impl RawMode {
    /// Raw mode on `fd` if it is a terminal; None if it is not.
    pub fn enable(fd: BorrowedFd<'_>) -> Option<RawMode> {
        let saved = tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let owned = fd.try_clone_to_owned().ok()?;
        tcsetattr(owned.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { fd: owned, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(self.fd.as_fd(), SetArg::TCSADRAIN, &self.saved);
    }
}

/// The terminal's size as (columns, rows), if `fd` is a terminal that knows it.
pub fn window_size(fd: BorrowedFd<'_>) -> Option<(u32, u32)> {
    let ws = rustix::termios::tcgetwinsize(fd).ok()?;
    if ws.ws_col == 0 || ws.ws_row == 0 {
        return None;
    }
    Some((u32::from(ws.ws_col), u32::from(ws.ws_row)))
}

/// Is `fd` a terminal?
pub fn is_tty(fd: BorrowedFd<'_>) -> bool {
    rustix::termios::isatty(fd)
}
