//! Port-I/O devices: the 8250 console, the i8042 reset line, and moat's control port.

pub mod control;
pub mod i8042;
pub mod serial;

pub use control::{ControlPort, BootTimes};
pub use i8042::I8042;
pub use serial::{SerialConsole, SerialSink};
