//! Where log lines go: standard error, or syslog (and so the journal) once the mount daemon
//! has detached from the terminal that started it.
//!
//! Filtering is `RUST_LOG`-style in both cases (`tracing_subscriber::EnvFilter`); each event
//! is one line, sent to syslog with the priority of its level under the `daemon` facility.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::fmt::MakeWriter;

static TO_SYSLOG: AtomicBool = AtomicBool::new(false);

/// From now on, log to syslog as `kmsfs[PID]` (called by the daemon as it detaches).
pub fn switch_to_syslog() {
    static IDENT: &std::ffi::CStr = c"kmsfs";
    // SAFETY: IDENT is a static NUL-terminated string, as openlog requires.
    unsafe {
        libc::openlog(
            IDENT.as_ptr(),
            libc::LOG_PID | libc::LOG_NDELAY,
            libc::LOG_DAEMON,
        )
    };
    TO_SYSLOG.store(true, Ordering::SeqCst);
}

/// The `MakeWriter` of the subscriber `main` installs.
pub struct LogWriter;

/// One event's bytes, written out when dropped.
pub struct EventWriter {
    buf: Vec<u8>,
    priority: libc::c_int,
}

impl Write for EventWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if !TO_SYSLOG.load(Ordering::Relaxed) {
            let _ = std::io::stderr().write_all(&self.buf);
            return;
        }
        // One line, without the colour codes a terminal got before the daemon detached.
        let mut line = Vec::with_capacity(self.buf.len());
        let mut bytes = self.buf.iter().copied();
        while let Some(b) = bytes.next() {
            match b {
                0x1b => {
                    for c in bytes.by_ref() {
                        if c.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
                0 | b'\n' => {}
                _ => line.push(b),
            }
        }
        if let Ok(c) = std::ffi::CString::new(line) {
            // SAFETY: a constant "%s" format and one NUL-terminated argument.
            unsafe { libc::syslog(self.priority, c"%s".as_ptr(), c.as_ptr()) };
        }
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter {
            buf: Vec::new(),
            priority: libc::LOG_INFO,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> EventWriter {
        use tracing::Level;
        let priority = match *meta.level() {
            Level::ERROR => libc::LOG_ERR,
            Level::WARN => libc::LOG_WARNING,
            Level::INFO => libc::LOG_INFO,
            _ => libc::LOG_DEBUG,
        };
        EventWriter {
            buf: Vec::new(),
            priority,
        }
    }
}
