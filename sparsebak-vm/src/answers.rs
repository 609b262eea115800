//! Where the receiver's answers go (stdout): framed messages through a
//! buffer, and chunk files appended by the kernel. A restore reads every
//! chunk of a session; reading each chunk file and writing it into the pipe
//! were two copies of every byte through the receiver's memory, about a
//! tenth of a restore's CPU. `sendfile(2)` hands the file's cached pages to
//! the pipe instead. Where stdout takes no `sendfile` (not a pipe, socket
//! or file), chunk files are copied through the buffer as before.

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::sendfile::sendfile;
use sparsebak_proto::frame::chunk_answer_head;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

/// Answers on their way to dom0.
pub struct AnswerStream<W: Write + AsFd> {
    out: BufWriter<W>,
    /// False once `sendfile` was refused for this output.
    zero_copy: bool,
}

impl<W: Write + AsFd> AnswerStream<W> {
    pub fn new(out: W) -> AnswerStream<W> {
        AnswerStream { out: BufWriter::with_capacity(1 << 20, out), zero_copy: true }
    }

    /// Sends a chunk answer holding the first `len` bytes of `file` (its
    /// length when opened). Once the answer's head is out, the answer must
    /// be whole: bytes the file cannot give (a read error, a file that
    /// shrank) are sent as zeros, which fail dom0's checks of that chunk
    /// alone, and the read error is returned for the receiver's stderr. An
    /// error writing to dom0 is the `Err`.
    pub fn send_chunk_file(&mut self, file: &File, len: u64) -> io::Result<Option<io::Error>> {
        let len_usize = usize::try_from(len).map_err(|_| io::Error::other("chunk file too large"))?;
        let head = chunk_answer_head(len_usize).map_err(|e| io::Error::other(e.to_string()))?;
        self.out.write_all(&head)?;
        let sent = if self.zero_copy { self.send_in_kernel(file, len)? } else { 0 };
        self.copy_rest(file, sent, len)
    }

    /// `sendfile` of the file as far as it goes: the bytes sent. It stops
    /// early at an error that may be the file's (the copy after it tells
    /// which side failed), and sends nothing where the output refuses it,
    /// which turns it off for the rest of the conversation.
    fn send_in_kernel(&mut self, file: &File, len: u64) -> io::Result<u64> {
        self.out.flush()?;
        let mut offset: i64 = 0;
        while (offset as u64) < len {
            let want = usize::try_from(len - offset as u64).unwrap_or(usize::MAX);
            match sendfile(self.out.get_ref().as_fd(), file.as_fd(), Some(&mut offset), want) {
                Ok(0) => break, // the file ended early: the copy pads
                Ok(_) => {}
                Err(Errno::EINTR) => {}
                // A non-blocking output that is full: wait as a blocking
                // write would (dom0 bounds its own waits).
                Err(Errno::EAGAIN) => {
                    let mut fds = [PollFd::new(self.out.get_ref().as_fd(), PollFlags::POLLOUT)];
                    match poll(&mut fds, PollTimeout::NONE) {
                        Ok(_) | Err(Errno::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(Errno::EINVAL | Errno::ENOSYS) if offset == 0 => {
                    self.zero_copy = false;
                    break;
                }
                Err(e @ (Errno::EPIPE | Errno::ECONNRESET)) => return Err(e.into()),
                Err(_) => break,
            }
        }
        Ok(offset as u64)
    }

    /// Copies `file` from `at` to `len` through the buffer, zeros for what
    /// cannot be read; the read error, if any.
    fn copy_rest(&mut self, file: &File, mut at: u64, len: u64) -> io::Result<Option<io::Error>> {
        let mut piece = [0u8; 64 << 10];
        while at < len {
            let want = piece.len().min(usize::try_from(len - at).unwrap_or(usize::MAX));
            match file.read_at(&mut piece[..want], at) {
                Ok(0) => return self.pad(at, len, short_file(at, len)),
                Ok(n) => {
                    self.out.write_all(&piece[..n])?;
                    at += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.pad(at, len, e),
            }
        }
        Ok(None)
    }

    /// Zeros from `at` to `len` in place of what could not be read.
    fn pad(&mut self, mut at: u64, len: u64, why: io::Error) -> io::Result<Option<io::Error>> {
        let zeros = [0u8; 64 << 10];
        while at < len {
            let n = zeros.len().min(usize::try_from(len - at).unwrap_or(usize::MAX));
            self.out.write_all(&zeros[..n])?;
            at += n as u64;
        }
        Ok(Some(why))
    }
}

fn short_file(got: u64, len: u64) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("chunk file ended after {got} of its {len} bytes"))
}

impl<W: Write + AsFd> Write for AnswerStream<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparsebak_proto::frame::encode_frame;
    use sparsebak_proto::{read_msg, write_msg, Response};
    use std::io::{Read, Seek};

    fn chunk_file(data: &[u8]) -> File {
        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(data).expect("write");
        f.rewind().expect("rewind");
        f
    }

    /// What a stream wrote: into a pipe (sendfile's case) read on another
    /// thread, or into a file.
    fn through_pipe(write: impl FnOnce(&mut AnswerStream<File>)) -> Vec<u8> {
        through_pipe_with(false, write)
    }

    /// The same through a non-blocking pipe read slowly, which fills up.
    fn through_pipe_with(nonblocking: bool, write: impl FnOnce(&mut AnswerStream<File>)) -> Vec<u8> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let (rx, tx) = nix::unistd::pipe().expect("pipe");
        if nonblocking {
            fcntl(std::os::fd::AsRawFd::as_raw_fd(&tx), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).expect("O_NONBLOCK");
        }
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut rx = File::from(rx);
            let mut piece = [0u8; 4096];
            loop {
                match rx.read(&mut piece).expect("read pipe") {
                    0 => return got,
                    n => got.extend_from_slice(&piece[..n]),
                }
                if nonblocking {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
        });
        let mut stream = AnswerStream::new(File::from(tx));
        write(&mut stream);
        stream.flush().expect("flush");
        drop(stream);
        reader.join().expect("reader")
    }

    /// Messages and chunk files interleave in order, each chunk file
    /// exactly as `write_msg` would have framed its bytes.
    #[test]
    fn chunk_files_are_framed_like_chunk_answers() {
        let a: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let b = b"tiny".to_vec();
        let mut want = encode_frame(&Response::Done).expect("frame");
        want.extend(encode_frame(&Response::Chunk(a.clone())).expect("frame"));
        want.extend(encode_frame(&Response::Chunk(Vec::new())).expect("frame"));
        want.extend(encode_frame(&Response::Chunk(b.clone())).expect("frame"));
        for zero_copy in [true, false] {
            let got = through_pipe(|s| {
                s.zero_copy = zero_copy;
                write_msg(s, &Response::Done).expect("done");
                assert!(s.send_chunk_file(&chunk_file(&a), a.len() as u64).expect("a").is_none());
                assert!(s.send_chunk_file(&chunk_file(&[]), 0).expect("empty").is_none());
                assert!(s.send_chunk_file(&chunk_file(&b), b.len() as u64).expect("b").is_none());
                assert_eq!(s.zero_copy, zero_copy, "a pipe takes sendfile");
            });
            assert!(got == want, "zero_copy {zero_copy}: {} bytes, want {}", got.len(), want.len());
            let mut r = got.as_slice();
            assert!(matches!(read_msg::<_, Response>(&mut r), Ok(Some(Response::Done))));
            assert!(matches!(read_msg::<_, Response>(&mut r), Ok(Some(Response::Chunk(d))) if d == a));
        }
    }

    /// A full non-blocking output is waited for, not an error or a spin.
    #[test]
    fn a_full_nonblocking_output_is_waited_for() {
        let a: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let got = through_pipe_with(true, |s| {
            assert!(s.send_chunk_file(&chunk_file(&a), a.len() as u64).expect("sent").is_none());
        });
        assert!(got == encode_frame(&Response::Chunk(a)).expect("frame"), "{} bytes", got.len());
    }

    /// A file shorter than announced still makes a whole answer (zeros in
    /// place of the missing bytes: that chunk fails dom0's checks, the
    /// conversation goes on), and the shortfall is reported.
    #[test]
    fn a_chunk_file_shorter_than_announced_is_padded_and_reported() {
        for zero_copy in [true, false] {
            let got = through_pipe(|s| {
                s.zero_copy = zero_copy;
                let why = s.send_chunk_file(&chunk_file(b"abc"), 10).expect("sent").expect("reported");
                assert_eq!(why.kind(), io::ErrorKind::UnexpectedEof, "zero_copy {zero_copy}: {why}");
                write_msg(s, &Response::Done).expect("done");
            });
            let mut r = got.as_slice();
            let padded = b"abc\0\0\0\0\0\0\0".to_vec();
            assert!(matches!(read_msg::<_, Response>(&mut r), Ok(Some(Response::Chunk(d))) if d == padded));
            assert!(matches!(read_msg::<_, Response>(&mut r), Ok(Some(Response::Done))), "in step after it");
        }
    }
}
