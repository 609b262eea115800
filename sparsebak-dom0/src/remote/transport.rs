//! Reaching the receiver: spawn it (locally, over ssh or through qrexec) and
//! talk frames over its stdin/stdout. Its stderr is relayed to the user line
//! by line.
//!
//! Everything read from the receiver is untrusted: frames are capped by the
//! decoder, every wait is bounded by `idletimeout`, its text is made
//! printable and capped before it is shown, and a receiver that dies or says
//! `Error` becomes a one-line error here.

use crate::chunk::{BufferPool, ChunkBuf};
use crate::config::{Config, DestVm};
use crate::ui::printable::{self, printable};
use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use sparsebak_proto::frame::{read_chunk_answer, ChunkRead};
use sparsebak_proto::{read_msg, write_msg, FrameError, Request, Response};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// The qrexec service the backup VM provides.
pub const QREXEC_SERVICE: &str = "qubes.SparsebakStore";
const RECEIVER_BIN: &str = "sparsebak-vm";
/// The size asked for the pipes to and from the receiver (Linux's default
/// is 64 KiB; 1 MiB is the default limit for unprivileged processes).
const PIPE_SIZE: i32 = 1 << 20;
/// The buffers on both pipes. Small next to a chunk on purpose: a chunk's
/// bytes then go straight between the pipe and the chunk's own buffer
/// (a `BufWriter` passes a write larger than itself through; a
/// `BufReader` does so for a read into it while empty) instead of being
/// copied through these; small messages are still gathered.
const PIPE_BUFFER: usize = 64 << 10;

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
    /// Where it runs: turns qrexec's exit codes into advice.
    dest: DestVm,
    /// Ends when the receiver's stderr does (see [`relay_stderr`]).
    stderr_done: mpsc::Receiver<()>,
    /// `[var] idletimeout`: also how long it may take to exit at the end.
    limit: Duration,
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
    /// Buffers that chunk answers are read into, back here when the chunk
    /// was checked.
    chunk_buffers: Arc<BufferPool>,
}

/// A pipe end that fails instead of blocking longer than `limit`: a receiver
/// that stops reading or answering must not hang dom0 (a timer-driven send
/// would otherwise pile up behind the lock forever).
pub struct Idle<T> {
    inner: T,
    limit: Duration,
}

impl<T: AsFd> Idle<T> {
    /// Wraps one end of a pipe to the receiver. The pipe is made
    /// non-blocking, so that no read or write can block past the poll that
    /// bounds it (a blocking write of a large buffer into a pipe the receiver
    /// stopped reading would never return), and enlarged: a 128 KiB chunk then
    /// crosses in one write instead of several wake-ups of both processes.
    fn new(inner: T, limit: Duration) -> std::io::Result<Self> {
        let fd = inner.as_fd();
        let flags = OFlag::from_bits_retain(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // Best effort: the size is capped by /proc/sys/fs/pipe-max-size, and
        // qrexec or ssh in between have their own buffers anyway.
        let _ = fcntl(fd.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        Ok(Idle { inner, limit })
    }

    /// Waits until the pipe is ready for `flags`, at most `limit`.
    fn wait(&self, flags: PollFlags) -> std::io::Result<()> {
        let ms = u16::try_from(self.limit.as_millis()).unwrap_or(u16::MAX);
        let deadline = Instant::now() + self.limit;
        loop {
            let mut fds = [PollFd::new(self.inner.as_fd(), flags)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) if Instant::now() >= deadline => {
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

    /// Runs a non-blocking `op` until it does something, waiting for
    /// `flags` whenever it would block.
    fn retry<R>(&mut self, flags: PollFlags, mut op: impl FnMut(&mut T) -> std::io::Result<R>) -> std::io::Result<R> {
        loop {
            match op(&mut self.inner) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.wait(flags)?,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }
}

impl<T: AsFd + Read> Read for Idle<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.retry(PollFlags::POLLIN, |inner| inner.read(buf))
    }
}

impl<T: AsFd + Write> Write for Idle<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.retry(PollFlags::POLLOUT, |inner| inner.write(buf))
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
            Ok(Some(resp)) => not_an_error(resp),
            Ok(None) => Err(closed()),
            Err(e) => Err(bad_frame(e)),
        }
    }

    /// The next response, where a chunk is expected: a chunk's bytes are
    /// read into a buffer of this source's pool; one longer than `max` is
    /// read past (its length is returned instead).
    pub(super) fn recv_chunk(&mut self, max: usize) -> Result<ReceivedChunk> {
        let mut buf = self.chunk_buffers.take_empty();
        match read_chunk_answer(&mut self.input, buf.vec_mut(), max) {
            Ok(Some(ChunkRead::Chunk)) => Ok(ReceivedChunk::Bytes(buf)),
            Ok(Some(ChunkRead::TooLong(len))) => Ok(ReceivedChunk::TooLong(len)),
            Ok(Some(ChunkRead::Other(resp))) => not_an_error(resp).map(ReceivedChunk::Other),
            Ok(None) => Err(closed()),
            Err(e) => Err(bad_frame(e)),
        }
    }
}

/// What came where a chunk was expected.
pub(super) enum ReceivedChunk {
    Bytes(ChunkBuf),
    /// A chunk longer than the limit, of this many bytes (not kept).
    TooLong(usize),
    Other(Response),
}

/// A receiver's `Error` answer as an error.
fn not_an_error(resp: Response) -> Result<Response> {
    match resp {
        Response::Error(msg) => bail!("receiver: {}", printable(&msg)),
        resp => Ok(resp),
    }
}

fn closed() -> anyhow::Error {
    anyhow!("the receiver closed the connection unexpectedly")
}

fn bad_frame(e: FrameError) -> anyhow::Error {
    match e {
        FrameError::Io(e) => anyhow!("reading from the receiver: {e}"),
        e => anyhow!("bad data from the receiver: {}", printable(&e.to_string())),
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
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the receiver ({})", argv.join(" ")))?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            bail!("receiver pipes unavailable");
        };
        let mut rx = Receiver {
            child,
            dest: config.dest_vm.clone(),
            stderr_done: relay_stderr(stderr)?,
            limit: config.idle_timeout,
            requests: RequestSink {
                out: BufWriter::with_capacity(PIPE_BUFFER, Idle::new(stdin, config.idle_timeout)?),
            },
            responses: ResponseSource {
                input: BufReader::with_capacity(PIPE_BUFFER, Idle::new(stdout, config.idle_timeout)?),
                chunk_buffers: BufferPool::new(),
            },
        };
        rx.hello(config.dest.clone())?;
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

    /// Adds how the receiver ended to `e`, once it has (it usually has
    /// when its stdout ended; it gets a moment to do so).
    fn with_exit_status(&mut self, e: anyhow::Error) -> anyhow::Error {
        let Ok(Some(status)) = exit_within(&mut self.child, STDERR_GRACE) else { return e };
        // Show what it said on its way out before our own error.
        let _ = self.stderr_done.recv_timeout(STDERR_GRACE);
        match status.success() {
            true => e,
            false => e.context(how_it_ended(&self.dest, status)),
        }
    }

    /// Closes the receiver's input and waits for it to exit cleanly.
    pub fn finish(self) -> Result<()> {
        let (requests, responses, process) = self.split();
        drop(requests);
        drop(responses);
        process.finish()
    }

    /// Ends a conversation that failed and was reported already: the
    /// receiver is stopped, its exit status no longer matters.
    pub fn abandon(self) {
        let (_, _, mut process) = self.split();
        process.kill();
    }

    /// Splits off the two halves for pipelined use (receive/verify): one
    /// thread sends requests while another reads answers.
    pub fn split(self) -> (RequestSink, ResponseSource, ReceiverProcess) {
        let Receiver { child, dest, stderr_done, limit, requests, responses } = self;
        (requests, responses, ReceiverProcess { child, dest, stderr_done, limit })
    }
}

/// The receiver's process after `split`: killed if dropped before `finish`.
pub struct ReceiverProcess {
    child: Child,
    dest: DestVm,
    stderr_done: mpsc::Receiver<()>,
    limit: Duration,
}

impl Drop for ReceiverProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

impl ReceiverProcess {
    /// Waits for the receiver to exit once the conversation is over, at
    /// most `idletimeout`: a receiver that lingers must not keep the command
    /// (and dom0's lock) waiting. By then everything it had to do was
    /// confirmed, so a straggler is stopped with a warning; the command's
    /// result stands.
    pub fn finish(mut self) -> Result<()> {
        match exit_within(&mut self.child, self.limit).context("waiting for the receiver")? {
            Some(status) => {
                let _ = self.stderr_done.recv_timeout(STDERR_GRACE);
                if !status.success() {
                    bail!("{}", how_it_ended(&self.dest, status));
                }
                Ok(())
            }
            None => {
                self.kill();
                log::warn!(
                    "the receiver did not exit within {} s (idletimeout) after its work was done; stopped it",
                    self.limit.as_secs()
                );
                Ok(())
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's exit status once it exits, waiting at most `limit`
/// (polling: std has no wait with a timeout); `None` if it is still running.
fn exit_within(child: &mut Child, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Why the receiver's process failed, in the user's terms. `qvm-run`
/// reports qrexec's own failures with exit codes that `sparsebak-vm` never
/// uses (it exits with 1).
fn how_it_ended(dest: &DestVm, status: ExitStatus) -> String {
    match (dest, status.code()) {
        (DestVm::Qubes(vm), Some(127)) => {
            format!("{QREXEC_SERVICE} is not installed in VM {vm} (install sparsebak-vm in its template)")
        }
        (DestVm::Qubes(vm), Some(126)) => format!(
            "the call of {QREXEC_SERVICE} in VM {vm} was refused by qrexec policy \
             (see /etc/qubes/policy.d/50-sparsebak.policy)"
        ),
        (DestVm::Qubes(vm), Some(125)) => format!("qrexec could not reach VM {vm} (is it running?)"),
        _ => format!("the receiver exited with {status}"),
    }
}

/// The most lines of the receiver's stderr shown per connection; the rest
/// is read and dropped, so that a chatty receiver cannot flood syslog.
const MAX_STDERR_LINES: usize = 100;
/// How long an exited receiver's last stderr lines are waited for.
const STDERR_GRACE: Duration = Duration::from_secs(1);

/// Relays the receiver's stderr from a thread of its own: each line becomes
/// one warning (`receiver: ...`), made printable and cut at
/// [`printable::MAX_SHOWN`] bytes however long the line is. The returned
/// channel disconnects when its stderr ends. The thread is never joined: a
/// receiver that lingers with its stderr open must not hold dom0.
fn relay_stderr(stderr: ChildStderr) -> Result<mpsc::Receiver<()>> {
    let (done, ended) = mpsc::channel();
    std::thread::Builder::new()
        .name("receiver stderr".into())
        .spawn(move || {
            let _done = done;
            let mut input = BufReader::new(stderr);
            let mut shown = 0;
            while let Some((line, len)) = read_line_capped(&mut input, printable::MAX_SHOWN) {
                if shown < MAX_STDERR_LINES {
                    let mut text = printable(&String::from_utf8_lossy(&line));
                    if len > line.len() {
                        text.push_str(&printable::cut_note(len - line.len()));
                    }
                    log::warn!("receiver: {text}");
                } else if shown == MAX_STDERR_LINES {
                    log::warn!("receiver: (more lines on stderr not shown)");
                }
                shown += 1;
            }
        })
        .context("starting the receiver's stderr relay")?;
    Ok(ended)
}

/// The next line of `input` without its newline, at most `cap` bytes of it
/// (the rest of a longer line is read and dropped), and the line's whole
/// length; `None` at the end.
fn read_line_capped(input: &mut impl BufRead, cap: usize) -> Option<(Vec<u8>, usize)> {
    let mut line = Vec::new();
    let mut len = 0;
    let mut any = false;
    loop {
        let buf = match input.fill_buf() {
            Ok([]) => return any.then_some((line, len)),
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return any.then_some((line, len)),
        };
        any = true;
        let (part, used, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        let room = cap.saturating_sub(line.len());
        line.extend_from_slice(&part[..part.len().min(room)]);
        len += part.len();
        input.consume(used);
        if end {
            return Some((line, len));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_lines_are_capped_and_split() {
        let long = format!("{}\nsecond\n\nlast", "x".repeat(5000));
        let mut input = std::io::Cursor::new(long.into_bytes());
        assert_eq!(read_line_capped(&mut input, 10), Some((b"xxxxxxxxxx".to_vec(), 5000)));
        assert_eq!(read_line_capped(&mut input, 10), Some((b"second".to_vec(), 6)));
        assert_eq!(read_line_capped(&mut input, 10), Some((Vec::new(), 0)));
        assert_eq!(read_line_capped(&mut input, 10), Some((b"last".to_vec(), 4)));
        assert_eq!(read_line_capped(&mut input, 10), None);
    }

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
