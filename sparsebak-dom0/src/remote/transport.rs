//! Reaching the receiver: spawn it (locally, over ssh or through qrexec) and
//! talk frames over its stdin/stdout. Its stderr passes through to the user.
//!
//! Everything read from the receiver is untrusted: frames are capped by the
//! decoder, and a receiver that dies or says `Error` becomes a one-line error
//! here.

use crate::config::{Config, DestVm};
use anyhow::{anyhow, bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use sparsebak_proto::{read_msg, write_msg, Destination, FrameError, Request, Response};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

/// The qrexec service the backup VM provides.
pub const QREXEC_SERVICE: &str = "qubes.SparsebakStore";
const RECEIVER_BIN: &str = "sparsebak-vm";

/// The argument vector that starts the receiver for `dest`.
pub fn receiver_argv(dest: &DestVm) -> Result<Vec<String>> {
    Ok(match dest {
        DestVm::Local => vec![local_receiver()?.to_string_lossy().into_owned(), "serve".into()],
        DestVm::Ssh { target, port } => {
            let mut v = vec!["ssh".to_string(), "-o".into(), "BatchMode=yes".into()];
            if let Some(p) = port {
                v.extend(["-p".to_string(), p.to_string()]);
            }
            v.extend(["--".to_string(), target.clone(), RECEIVER_BIN.into(), "serve".into()]);
            v
        }
        DestVm::Qubes(vm) => {
            vec!["qvm-run".into(), "--pass-io".into(), "--service".into(), vm.clone(), QREXEC_SERVICE.into()]
        }
    })
}

/// `sparsebak-vm` next to our own binary, else on PATH.
fn local_receiver() -> Result<PathBuf> {
    if let Some(dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(PathBuf::from)) {
        let beside = dir.join(RECEIVER_BIN);
        if beside.is_file() {
            return Ok(beside);
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(RECEIVER_BIN))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{RECEIVER_BIN} not found next to sparsebak or on PATH"))
}

/// A running receiver after a successful handshake.
pub struct Receiver {
    child: Child,
    pub requests: RequestSink,
    pub responses: ResponseSource,
}

/// dom0 -> receiver.
pub struct RequestSink {
    out: BufWriter<Idle<ChildStdin>>,
}

/// receiver -> dom0.
pub struct ResponseSource {
    input: BufReader<Idle<ChildStdout>>,
}

/// A pipe end that fails instead of blocking longer than `limit`: a receiver
/// that stops reading or answering must not hang dom0 (a timer-driven send
/// would otherwise pile up behind the lock forever).
pub struct Idle<T> {
    inner: T,
    limit: Duration,
}

impl<T: AsFd> Idle<T> {
    fn wait(&self, flags: PollFlags) -> std::io::Result<()> {
        let ms = u16::try_from(self.limit.as_millis()).unwrap_or(u16::MAX);
        let deadline = std::time::Instant::now() + self.limit;
        loop {
            let mut fds = [PollFd::new(self.inner.as_fd(), flags)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) if std::time::Instant::now() >= deadline => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no progress from the receiver for {} s (idletimeout)", self.limit.as_secs()),
                    ))
                }
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl<T: AsFd + Read> Read for Idle<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.wait(PollFlags::POLLIN)?;
        self.inner.read(buf)
    }
}

impl<T: AsFd + Write> Write for Idle<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.wait(PollFlags::POLLOUT)?;
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl RequestSink {
    /// Queues a request (buffered; see `flush`).
    pub(super) fn send(&mut self, req: &Request) -> Result<()> {
        write_msg(&mut self.out, req).map_err(|e| anyhow!("sending to the receiver: {e}"))
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().context("sending to the receiver")
    }
}

impl ResponseSource {
    /// The next response; a receiver `Error`, a bad frame or the end of the
    /// stream is an error.
    pub(super) fn recv(&mut self) -> Result<Response> {
        match read_msg(&mut self.input) {
            Ok(Some(Response::Error(msg))) => bail!("receiver: {msg}"),
            Ok(Some(resp)) => Ok(resp),
            Ok(None) => bail!("the receiver closed the connection unexpectedly"),
            Err(FrameError::Io(e)) => Err(anyhow!("reading from the receiver: {e}")),
            Err(e) => Err(anyhow!("bad data from the receiver: {e}")),
        }
    }
}

impl Receiver {
    /// Starts the receiver and does the handshake.
    pub fn connect(config: &Config) -> Result<Receiver> {
        let argv = receiver_argv(&config.dest_vm)?;
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the receiver ({})", argv.join(" ")))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("receiver pipes unavailable");
        };
        let mut rx = Receiver {
            child,
            requests: RequestSink {
                out: BufWriter::with_capacity(1 << 20, Idle { inner: stdin, limit: config.idle_timeout }),
            },
            responses: ResponseSource {
                input: BufReader::with_capacity(1 << 20, Idle { inner: stdout, limit: config.idle_timeout }),
            },
        };
        rx.hello(Destination { mountpoint: config.dest_mountpoint.clone(), dir: config.dest_dir.clone() })?;
        Ok(rx)
    }

    /// Sends one request and waits for its answer. On a broken pipe, the
    /// receiver's own explanation (if it sent one) is preferred.
    pub(super) fn call(&mut self, req: &Request) -> Result<Response> {
        if let Err(e) = self.requests.send(req).and_then(|_| self.requests.flush()) {
            return Err(self.explain(e));
        }
        self.responses.recv().map_err(|e| self.with_exit_status(e))
    }

    /// Sends a request that gets no answer (streamed chunks).
    pub(super) fn send(&mut self, req: &Request) -> Result<()> {
        self.requests.send(req).map_err(|e| self.explain(e))
    }

    /// After a failed write: the receiver has usually said why before it
    /// exited, so read that instead of reporting a bare broken pipe.
    fn explain(&mut self, write_err: anyhow::Error) -> anyhow::Error {
        loop {
            match self.responses.recv() {
                Ok(_) => continue,
                Err(e) if e.to_string().starts_with("receiver: ") => return e,
                Err(_) => return self.with_exit_status(write_err),
            }
        }
    }

    fn with_exit_status(&mut self, e: anyhow::Error) -> anyhow::Error {
        match self.child.try_wait() {
            Ok(Some(status)) if !status.success() => e.context(format!("the receiver exited with {status}")),
            _ => e,
        }
    }

    /// Closes the receiver's input and waits for it to exit cleanly.
    pub fn finish(self) -> Result<()> {
        let Receiver { mut child, requests, responses } = self;
        drop(requests);
        drop(responses);
        let status = child.wait().context("waiting for the receiver")?;
        if !status.success() {
            bail!("the receiver exited with {status}");
        }
        Ok(())
    }

    /// Splits off the two halves for pipelined use (receive/verify): one
    /// thread sends requests while another reads answers.
    pub fn split(self) -> (RequestSink, ResponseSource, ReceiverProcess) {
        let Receiver { child, requests, responses } = self;
        (requests, responses, ReceiverProcess { child })
    }
}

/// The receiver's process after `split`: killed if dropped before `finish`.
pub struct ReceiverProcess {
    child: Child,
}

impl Drop for ReceiverProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

impl ReceiverProcess {
    pub fn finish(mut self) -> Result<()> {
        let status = self.child.wait().context("waiting for the receiver")?;
        if !status.success() {
            bail!("the receiver exited with {status}");
        }
        Ok(())
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qrexec_argv() {
        let argv = receiver_argv(&DestVm::Qubes("backup".into())).expect("argv");
        assert_eq!(argv, ["qvm-run", "--pass-io", "--service", "backup", "qubes.SparsebakStore"]);
    }

    #[test]
    fn ssh_argv_keeps_target_out_of_options() {
        let argv = receiver_argv(&DestVm::Ssh { target: "bak@host".into(), port: Some(2222) }).expect("argv");
        assert_eq!(argv, ["ssh", "-o", "BatchMode=yes", "-p", "2222", "--", "bak@host", "sparsebak-vm", "serve"]);
        let argv = receiver_argv(&DestVm::Ssh { target: "bak@host".into(), port: None }).expect("argv");
        assert_eq!(argv, ["ssh", "-o", "BatchMode=yes", "--", "bak@host", "sparsebak-vm", "serve"]);
    }
}
