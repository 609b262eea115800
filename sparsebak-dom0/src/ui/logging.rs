//! Messages for the user, through the `log` crate so that every part of the
//! program reports the same way.
//!
//! - stderr always: errors and warnings prefixed with `sparsebak: error:` /
//!   `sparsebak: warning:`, progress lines plain. While a progress bar is on
//!   the screen, lines are printed above it (see `progress::suspend`).
//! - syslog as well, when stdout is not a terminal: that is how cron and
//!   systemd timers run `sparsebak monitor` / `send`, and there nobody reads
//!   stderr later, so the journal keeps the trace. When no syslog socket can
//!   be reached (a container without /dev/log), stderr alone is used: a
//!   missing logger must never make a backup fail.
//! - `-q` keeps errors only (in both places), `-v` adds detail.

use crate::ui::printable::printable_within;
use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::{Mutex, OnceLock, PoisonError};
use syslog::{Facility, Formatter3164, LoggerBackend};

type SyslogSink = syslog::Logger<LoggerBackend, Formatter3164>;

/// The longest log message shown, in bytes.
const MAX_LINE: usize = 4096;

/// The program's logger: stderr, plus syslog when connected.
struct Logger {
    syslog: Option<Mutex<SyslogSink>>,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // Every line leaves on one line, printable and bounded, whatever
        // text from outside it quotes (most is made printable where it
        // enters already; this is the last line of defence).
        let msg = printable_within(&record.args().to_string(), MAX_LINE);
        let line = stderr_line(record.level(), &msg);
        // A closed or full stderr (`sparsebak verify 2>&1 | head -1`,
        // `2>/dev/full`) must not turn into a panic: the message is lost,
        // the command goes on and its exit status still tells.
        crate::ui::suspend(|| {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        });
        if let Some(sink) = &self.syslog {
            // A sink that stops working must not stop the backup; the
            // message still reached stderr.
            let mut sink = sink.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = to_syslog(&mut sink, record.level(), &msg);
        }
    }

    fn flush(&self) {}
}

/// How a message looks on stderr.
fn stderr_line(level: Level, msg: &str) -> String {
    match level {
        Level::Error => format!("sparsebak: error: {msg}"),
        Level::Warn => format!("sparsebak: warning: {msg}"),
        _ => msg.to_string(),
    }
}

fn to_syslog(sink: &mut SyslogSink, level: Level, msg: &str) -> syslog::Result<()> {
    match level {
        Level::Error => sink.err(msg),
        Level::Warn => sink.warning(msg),
        Level::Info => sink.info(msg),
        Level::Debug | Level::Trace => sink.debug(msg),
    }
}

/// The level for `-q` / `-v`.
fn level_for(quiet: bool, verbose: bool) -> LevelFilter {
    if quiet {
        LevelFilter::Error
    } else if verbose {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    }
}

/// A syslog connection when stdout is not a terminal; `socket` overrides
/// the system's (/dev/log) for tests.
fn syslog_for(stdout_is_terminal: bool, socket: Option<&Path>) -> Option<SyslogSink> {
    if stdout_is_terminal {
        return None;
    }
    let formatter = Formatter3164 {
        facility: Facility::LOG_USER,
        hostname: None,
        process: "sparsebak".into(),
        pid: std::process::id(),
    };
    match socket {
        Some(path) => syslog::unix_custom(formatter, path).ok(),
        None => syslog::unix(formatter).ok(),
    }
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Installs the logger once, for the whole process.
pub fn init(quiet: bool, verbose: bool) {
    let logger =
        LOGGER.get_or_init(|| Logger { syslog: syslog_for(std::io::stdout().is_terminal(), None).map(Mutex::new) });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level_for(quiet, verbose));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    /// A syslog daemon stand-in: a datagram socket in a temp dir.
    fn fake_syslog() -> (tempfile::TempDir, std::path::PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let sock = UnixDatagram::bind(&path).expect("bind fake syslog");
        sock.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        (dir, path, sock)
    }

    fn received(sock: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[test]
    fn syslog_only_when_stdout_is_not_a_terminal() {
        let (_dir, path, sock) = fake_syslog();
        assert!(syslog_for(true, Some(&path)).is_none(), "on a terminal, stderr is enough");
        let mut sink = syslog_for(false, Some(&path)).expect("connects to the socket");
        to_syslog(&mut sink, Level::Warn, "the archive lacks a session").expect("sent");
        to_syslog(&mut sink, Level::Error, "disk full").expect("sent");
        let got = received(&sock);
        assert_eq!(got.len(), 2, "{got:?}");
        // RFC 3164: <PRI> with facility user (1): warning = 8+4, err = 8+3.
        assert!(got[0].starts_with("<12>"), "{}", got[0]);
        assert!(got[0].contains("sparsebak[") && got[0].ends_with("the archive lacks a session"), "{}", got[0]);
        assert!(got[1].starts_with("<11>") && got[1].ends_with("disk full"), "{}", got[1]);
    }

    #[test]
    fn no_syslog_socket_is_not_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(syslog_for(false, Some(&dir.path().join("none"))).is_none());
    }

    #[test]
    fn quiet_keeps_errors_only() {
        assert_eq!(level_for(true, false), LevelFilter::Error);
        assert_eq!(level_for(false, false), LevelFilter::Info);
        assert_eq!(level_for(false, true), LevelFilter::Debug);
        assert_eq!(stderr_line(Level::Warn, "x"), "sparsebak: warning: x");
        assert_eq!(stderr_line(Level::Info, "x"), "x");
    }
}
