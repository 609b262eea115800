//! Length-prefixed frames carrying one bincode-encoded message each.
//!
//! A frame is a 4-byte big-endian payload length followed by the payload.
//! Every frame is capped at [`MAX_FRAME`] bytes, checked before anything is
//! allocated, so a hostile peer cannot make the reader allocate without bound.

use serde::{de::DeserializeOwned, Serialize};
use std::io::{self, BufRead, Read, Write};
use std::sync::OnceLock;

/// Largest payload accepted in one frame. Chunks are at most
/// [`crate::msg::MAX_CHUNK_SIZE`] before compression; zstd's worst-case
/// expansion is far below the headroom left here.
pub const MAX_FRAME: usize = 8 << 20;

const LEN_BYTES: usize = 4;

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    /// The stream ended in the middle of a frame.
    Truncated,
    /// The peer announced a frame larger than [`MAX_FRAME`].
    Oversize(usize),
    /// The payload is not a valid message (unknown kind, bad field, trailing bytes).
    Malformed(String),
    /// The underlying pipe failed.
    Io(io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Truncated => write!(f, "stream ended in the middle of a frame"),
            FrameError::Oversize(n) => {
                write!(f, "frame of {n} bytes exceeds the {MAX_FRAME}-byte cap")
            }
            FrameError::Malformed(e) => write!(f, "malformed message: {e}"),
            FrameError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for FrameError {}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    write_msg(&mut out, msg)?;
    Ok(out)
}

/// The payload length of `msg`'s frame, checked against [`MAX_FRAME`]
/// (cheap: a chunk's bytes are counted, not copied).
fn payload_len<T: Serialize>(msg: &T) -> Result<usize, FrameError> {
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(msg, &mut size, config()).map_err(|e| FrameError::Malformed(e.to_string()))?;
    match size.bytes_written {
        len if len > MAX_FRAME => Err(FrameError::Oversize(len)),
        len => Ok(len),
    }
}

/// Decodes one frame's payload; trailing bytes are an error.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, used) =
        bincode::serde::decode_from_slice(payload, config()).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::Malformed(format!("{} trailing bytes after message", payload.len() - used)));
    }
    Ok(msg)
}

/// Writes one message as a frame. Does not flush.
///
/// The length is measured first, so that the message is encoded straight
/// into `w`: a chunk's bytes are not copied into a frame buffer first (a
/// `BufWriter` passes writes larger than its buffer through). Nothing is
/// written for a message that is too large.
pub fn write_msg<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let len = payload_len(msg)?;
    w.write_all(&(len as u32).to_be_bytes()).map_err(FrameError::Io)?;
    let mut counted = CountingWriter { inner: w, written: 0 };
    bincode::serde::encode_into_std_write(msg, &mut counted, config()).map_err(|e| match e {
        bincode::error::EncodeError::Io { inner, .. } => FrameError::Io(inner),
        e => FrameError::Malformed(e.to_string()),
    })?;
    if counted.written != len {
        return Err(FrameError::Malformed(format!("encoded {} bytes, measured {len}", counted.written)));
    }
    Ok(())
}

/// What [`write_msg`] writes for `Response::Chunk` of `len` bytes before the
/// bytes themselves (frame length, message kind, byte count). The receiver
/// writes this and then has the kernel append the chunk file (`sendfile`),
/// so the bytes never pass through its memory.
///
/// Derived from the encoding of an empty chunk answer ([`chunk_kind`]), so
/// it follows whatever bincode does.
pub fn chunk_answer_head(len: usize) -> Result<Vec<u8>, FrameError> {
    let kind = chunk_kind()?;
    let count =
        bincode::serde::encode_to_vec(len as u64, config()).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let payload = (kind.len() + count.len()).saturating_add(len);
    if payload > MAX_FRAME {
        return Err(FrameError::Oversize(payload));
    }
    let mut head = Vec::with_capacity(LEN_BYTES + kind.len() + count.len());
    head.extend_from_slice(&(payload as u32).to_be_bytes());
    head.extend_from_slice(kind);
    head.extend_from_slice(&count);
    Ok(head)
}

/// Counts what passes through, to check the encoding against the length
/// already written.
struct CountingWriter<'a, W> {
    inner: &'a mut W,
    written: usize,
}

impl<W: Write> Write for CountingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads one message. Returns `Ok(None)` on a clean end of stream at a frame
/// boundary, which is how a peer says it is done.
pub fn read_msg<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<Option<T>, FrameError> {
    let Some(len) = read_frame_len(r)? else { return Ok(None) };
    decode_frame_body(r, len).map(Some)
}

/// Decodes the message of a frame whose `len`-byte payload comes next;
/// bytes left over are an error.
///
/// Decoded straight from the stream: a chunk's bytes land once, in the
/// message's own buffer, without a frame-sized buffer and a copy in
/// between. The frame's length bounds what the decoder may read.
fn decode_frame_body<R: Read, T: DeserializeOwned>(r: &mut R, len: usize) -> Result<T, FrameError> {
    let mut body = r.take(len as u64);
    let msg = decode_from(&mut body)?;
    match body.limit() {
        0 => Ok(msg),
        left => Err(FrameError::Malformed(format!("{left} trailing bytes after message"))),
    }
}

/// The payload length of the next frame; `None` at a clean end of stream.
fn read_frame_len<R: Read>(r: &mut R) -> Result<Option<usize>, FrameError> {
    let mut len_buf = [0u8; LEN_BYTES];
    match read_full(r, &mut len_buf)? {
        0 => return Ok(None),
        LEN_BYTES => {}
        _ => return Err(FrameError::Truncated),
    }
    match u32::from_be_bytes(len_buf) as usize {
        len if len > MAX_FRAME => Err(FrameError::Oversize(len)),
        len => Ok(Some(len)),
    }
}

/// Decodes one value from the rest of a frame (`body` is limited to it).
fn decode_from<R: Read, T: DeserializeOwned>(body: &mut io::Take<R>) -> Result<T, FrameError> {
    bincode::serde::decode_from_std_read(&mut *body, config()).map_err(|e| match e {
        bincode::error::DecodeError::Io { inner, .. } => match inner.kind() {
            // The frame ended before the message did.
            io::ErrorKind::UnexpectedEof if body.limit() == 0 => {
                FrameError::Malformed("message longer than its frame".into())
            }
            // The stream ended before the frame did.
            io::ErrorKind::UnexpectedEof => FrameError::Truncated,
            _ => FrameError::Io(inner),
        },
        e => FrameError::Malformed(e.to_string()),
    })
}

/// One answer to a chunk read, as [`read_chunk_answer`] found it.
#[derive(Debug)]
pub enum ChunkRead {
    /// A chunk: its bytes are in the caller's buffer.
    Chunk,
    /// A chunk longer than the caller's limit, of this many bytes: they
    /// were read past, not kept.
    TooLong(usize),
    /// Any other answer.
    Other(crate::Response),
}

/// Reads the answer to a chunk read. A chunk's bytes go straight from the
/// stream into `buf` (its content is replaced): the caller keeps the
/// buffer for the next chunk, so neither a fresh allocation (page faults,
/// zero-filling) nor a copy out of a decoded message is paid per chunk.
/// Chunks longer than `max` are read past without being kept.
///
/// The bytes are the same as [`read_msg`] reads (tested against it); a
/// reader that cannot see the message's kind in its buffer decodes the
/// answer the general way.
pub fn read_chunk_answer<R: BufRead>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<Option<ChunkRead>, FrameError> {
    let kind = chunk_kind()?;
    Ok(read_bytes_message::<_, (), crate::Response>(r, kind, buf, max)?.map(|read| match read {
        BytesRead::Bytes(()) => ChunkRead::Chunk,
        BytesRead::TooLong((), n) => ChunkRead::TooLong(n),
        // A chunk whose kind was written the long way (bincode accepts
        // that): decoded whole, held to the same limit.
        BytesRead::Other(crate::Response::Chunk(data)) if data.len() > max => ChunkRead::TooLong(data.len()),
        BytesRead::Other(crate::Response::Chunk(data)) => {
            *buf = data;
            ChunkRead::Chunk
        }
        BytesRead::Other(other) => ChunkRead::Other(other),
    }))
}

/// Reads one request; a `PutChunk`'s bytes go straight from the stream
/// into `spare`, which becomes the request's `data` (the caller's buffer,
/// kept from an earlier chunk: see [`read_chunk_answer`] for why). `spare`
/// is left alone for any other request.
pub fn read_request_into<R: BufRead>(r: &mut R, spare: &mut Vec<u8>) -> Result<Option<crate::Request>, FrameError> {
    static KIND: OnceLock<Vec<u8>> = OnceLock::new();
    let kind = kind_of(&KIND, &crate::Request::PutChunk { addr: 0, data: Vec::new() })?;
    match read_bytes_message::<_, u64, crate::Request>(r, kind, spare, MAX_FRAME)? {
        None => Ok(None),
        Some(BytesRead::Bytes(addr)) => Ok(Some(crate::Request::PutChunk { addr, data: std::mem::take(spare) })),
        // Not reached: no frame holds more than MAX_FRAME.
        Some(BytesRead::TooLong(_, n)) => Err(FrameError::Oversize(n)),
        Some(BytesRead::Other(req)) => Ok(Some(req)),
    }
}

/// A message read by [`read_bytes_message`].
enum BytesRead<H, M> {
    /// Of the kind asked for: its fields before the bytes (the bytes are in
    /// the caller's buffer).
    Bytes(H),
    /// Of the kind asked for, with more bytes than the limit (read past):
    /// its fields and the byte count.
    TooLong(H, usize),
    /// Of another kind, decoded.
    Other(M),
}

/// Reads one frame holding an `M`. If it is of the kind whose encoding
/// starts with `kind` (a variant whose last field is a byte string, with
/// the fields `H` before it), the bytes are read into `buf` (its content
/// replaced; none kept past `max`). Same results as [`read_msg`], for
/// which the message would be decoded whole.
fn read_bytes_message<R: BufRead, H: DeserializeOwned, M: DeserializeOwned>(
    r: &mut R,
    kind: &[u8],
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<Option<BytesRead<H, M>>, FrameError> {
    let Some(len) = read_frame_len(r)? else { return Ok(None) };
    let ours = len >= kind.len() && r.fill_buf().map_err(FrameError::Io)?.starts_with(kind);
    if !ours {
        return decode_frame_body(r, len).map(|msg| Some(BytesRead::Other(msg)));
    }
    r.consume(kind.len());
    let mut body = r.take((len - kind.len()) as u64);
    let head: H = decode_from(&mut body)?;
    let count: u64 = decode_from(&mut body)?;
    let left = body.limit();
    if count > left {
        return Err(FrameError::Malformed("message longer than its frame".into()));
    }
    if count < left {
        return Err(FrameError::Malformed(format!("{} trailing bytes after message", left - count)));
    }
    let count = count as usize; // at most MAX_FRAME
    let got = if count > max {
        io::copy(&mut body, &mut io::sink()).map_err(FrameError::Io)? as usize
    } else {
        buf.clear();
        buf.reserve(count);
        body.read_to_end(buf).map_err(FrameError::Io)?
    };
    match got {
        _ if got < count => Err(FrameError::Truncated),
        _ if count > max => Ok(Some(BytesRead::TooLong(head, count))),
        _ => Ok(Some(BytesRead::Bytes(head))),
    }
}

/// How messages of `sample`'s kind begin: its variant's index as encoded
/// (bincode writes it first), worked out once into `cell`.
fn kind_of<'a, T: Serialize>(cell: &'a OnceLock<Vec<u8>>, sample: &T) -> Result<&'a [u8], FrameError> {
    if cell.get().is_none() {
        let bytes =
            bincode::serde::encode_to_vec(sample, config()).map_err(|e| FrameError::Malformed(e.to_string()))?;
        let (_index, used): (u32, usize) =
            bincode::serde::decode_from_slice(&bytes, config()).map_err(|e| FrameError::Malformed(e.to_string()))?;
        let _ = cell.set(bytes[..used].to_vec());
    }
    cell.get().map(Vec::as_slice).ok_or_else(|| FrameError::Malformed("message kind".into()))
}

/// The encoding of a chunk answer's kind.
fn chunk_kind() -> Result<&'static [u8], FrameError> {
    static KIND: OnceLock<Vec<u8>> = OnceLock::new();
    kind_of(&KIND, &crate::Response::Chunk(Vec::new()))
}

/// Whether `buf` begins with a whole frame (so reading it cannot block):
/// lets a reader batch the requests that have already arrived.
pub fn holds_whole_frame(buf: &[u8]) -> bool {
    match buf.get(..LEN_BYTES) {
        Some(len) => {
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            buf.len() - LEN_BYTES >= len
        }
        None => false,
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head plus the bytes is exactly the frame `write_msg` makes, at
    /// every size where the byte count's encoding changes.
    #[test]
    fn chunk_answer_head_matches_the_encoded_answer() {
        for len in [0usize, 1, 250, 251, 252, 65535, 65536, 131072, 4 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut sent = chunk_answer_head(len).expect("head");
            sent.extend_from_slice(&data);
            assert_eq!(sent, encode_frame(&crate::Response::Chunk(data)).expect("encodes"), "len {len}");
        }
        assert!(matches!(chunk_answer_head(MAX_FRAME), Err(FrameError::Oversize(_))));
    }

    #[test]
    fn whole_frames_are_recognised() {
        let frame = encode_frame(&crate::Request::Commit).expect("encodes");
        assert!(holds_whole_frame(&frame));
        let mut two = frame.clone();
        two.extend_from_slice(&frame);
        assert!(holds_whole_frame(&two));
        for cut in 0..frame.len() {
            assert!(!holds_whole_frame(&frame[..cut]), "{cut}");
        }
    }
    use crate::msg::{Request, Response};
    use proptest::prelude::*;

    fn frame_of(req: &Request) -> Vec<u8> {
        encode_frame(req).expect("encodes")
    }

    #[test]
    fn round_trip_and_clean_eof() {
        let reqs = vec![Request::PutChunk { addr: 0x20000, data: vec![1, 2, 3] }, Request::Commit];
        let mut buf = Vec::new();
        for r in &reqs {
            write_msg(&mut buf, r).expect("writes");
        }
        let mut rd = &buf[..];
        for r in &reqs {
            let got: Request = read_msg(&mut rd).expect("reads").expect("a message");
            assert_eq!(&got, r);
        }
        assert!(read_msg::<_, Request>(&mut rd).expect("clean eof").is_none());
    }

    #[test]
    fn truncated_length_and_payload_are_errors() {
        let frame = frame_of(&Request::PutChunk { addr: 7, data: vec![9; 100] });
        for cut in [1, 3, 5, frame.len() - 1] {
            let mut rd = &frame[..cut];
            let err = read_msg::<_, Request>(&mut rd).expect_err("truncated");
            assert!(matches!(err, FrameError::Truncated), "cut {cut}: {err}");
        }
    }

    #[test]
    fn an_oversize_message_is_not_written_at_all() {
        let mut out = Vec::new();
        let err = write_msg(&mut out, &crate::Request::PutChunk { addr: 0, data: vec![0; MAX_FRAME] })
            .expect_err("too large");
        assert!(matches!(err, FrameError::Oversize(n) if n > MAX_FRAME), "{err}");
        assert!(out.is_empty(), "{} bytes written", out.len());
        write_msg(&mut out, &crate::Request::PutChunk { addr: 0, data: vec![7; 1000] }).expect("fits");
        assert_eq!(out, encode_frame(&crate::Request::PutChunk { addr: 0, data: vec![7; 1000] }).expect("encodes"));
        assert_eq!(u32::from_be_bytes([out[0], out[1], out[2], out[3]]) as usize, out.len() - LEN_BYTES);
    }

    #[test]
    fn oversize_frame_is_rejected_before_allocation() {
        let mut bytes = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0; 16]);
        let err = read_msg::<_, Request>(&mut &bytes[..]).expect_err("oversize");
        assert!(matches!(err, FrameError::Oversize(n) if n == MAX_FRAME + 1));
        let err = read_msg::<_, Request>(&mut &[0xff, 0xff, 0xff, 0xff][..]).expect_err("huge");
        assert!(matches!(err, FrameError::Oversize(_)));
    }

    #[test]
    fn unknown_kind_and_trailing_bytes_are_malformed() {
        // Variant index 200 does not exist.
        let bytes = [0, 0, 0, 1, 200];
        let err = read_msg::<_, Response>(&mut &bytes[..]).expect_err("unknown kind");
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");

        let mut frame = frame_of(&Request::Commit);
        frame.push(0);
        let len = (frame.len() - LEN_BYTES) as u32;
        frame[..LEN_BYTES].copy_from_slice(&len.to_be_bytes());
        let err = read_msg::<_, Request>(&mut &frame[..]).expect_err("trailing");
        assert!(matches!(err, FrameError::Malformed(ref m) if m.contains("trailing")), "{err}");
    }

    #[test]
    fn inner_length_larger_than_frame_is_malformed() {
        // PutChunk whose byte vector claims 1 GiB inside a small frame.
        let mut payload = frame_of(&Request::PutChunk { addr: 1, data: vec![] })[LEN_BYTES..].to_vec();
        payload.pop(); // drop the zero length
        payload.extend_from_slice(&[252, 0, 0, 0, 64]); // varint u32 = 1 GiB
        let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        let err = read_msg::<_, Request>(&mut &bytes[..]).expect_err("lying length");
        assert!(matches!(err, FrameError::Malformed(_) | FrameError::Truncated), "{err}");

        // A frame cut short around its message, with the next frame's bytes
        // behind it: the decoder stops at the frame's end.
        let whole = frame_of(&Request::PutChunk { addr: 1, data: vec![5; 10] });
        let mut short = whole.clone();
        short.truncate(whole.len() - 4);
        let len = (short.len() - LEN_BYTES) as u32;
        short[..LEN_BYTES].copy_from_slice(&len.to_be_bytes());
        short.extend_from_slice(&frame_of(&Request::Commit));
        let err = read_msg::<_, Request>(&mut &short[..]).expect_err("message longer than frame");
        assert!(matches!(err, FrameError::Malformed(ref m) if m.contains("longer than its frame")), "{err}");
    }

    /// Reads `stream` frame by frame with both readers (the chunk reader
    /// through a small buffer, as a pipe delivers) and fails where they
    /// differ: same answers, same bytes, an error at the same frame.
    fn agree(stream: &[u8], max: usize) -> Result<(), TestCaseError> {
        let mut general = stream;
        let mut chunked = io::BufReader::with_capacity(7, stream);
        let mut buf = vec![0xee; 3];
        for _ in 0..16 {
            let want = read_msg::<_, Response>(&mut general);
            let got = read_chunk_answer(&mut chunked, &mut buf, max);
            match (want, got) {
                (Ok(None), Ok(None)) => return Ok(()),
                (Ok(Some(Response::Chunk(d))), Ok(Some(ChunkRead::Chunk))) => {
                    prop_assert!(d.len() <= max);
                    prop_assert_eq!(&d, &buf);
                }
                (Ok(Some(Response::Chunk(d))), Ok(Some(ChunkRead::TooLong(n)))) => {
                    prop_assert!(n > max);
                    prop_assert_eq!(d.len(), n);
                }
                (_, Ok(Some(ChunkRead::Other(Response::Chunk(_))))) => prop_assert!(false, "a chunk not read as one"),
                (Ok(Some(w)), Ok(Some(ChunkRead::Other(g)))) => prop_assert_eq!(w, g),
                // Where a frame claims more than the stream holds, one may
                // call it cut short and the other too long for its message.
                (Err(_), Err(_)) => return Ok(()),
                (w, g) => prop_assert!(false, "read_msg: {:?}, chunk reader: {:?}", w.map(|_| ()), g),
            }
        }
        Ok(())
    }

    /// The same for requests: `read_request_into` against `read_msg`.
    fn agree_on_requests(stream: &[u8]) -> Result<(), TestCaseError> {
        let mut general = stream;
        let mut special = io::BufReader::with_capacity(7, stream);
        let mut spare = vec![0xee; 3];
        for _ in 0..16 {
            match (read_msg::<_, Request>(&mut general), read_request_into(&mut special, &mut spare)) {
                (Ok(None), Ok(None)) => return Ok(()),
                (Ok(Some(w)), Ok(Some(g))) => prop_assert_eq!(w, g),
                (Err(_), Err(_)) => return Ok(()),
                (w, g) => prop_assert!(false, "read_msg: {:?}, read_request_into: {:?}", w.map(|_| ()), g.map(|_| ())),
            }
            if spare.capacity() == 0 {
                spare = vec![0xdd; 5]; // taken by a PutChunk: a fresh dirty one
            }
        }
        Ok(())
    }

    /// A chunk answer whose kind is written the long way (a varint of three
    /// bytes, which bincode also accepts) is still read as a chunk, held to
    /// the same limit.
    #[test]
    fn a_chunk_kind_written_the_long_way_is_a_chunk() {
        let short = chunk_kind().expect("kind").to_vec();
        assert_eq!(short.len(), 1);
        let payload = [vec![251, short[0], 0], vec![2, b'x', b'y']].concat();
        let frame = [(payload.len() as u32).to_be_bytes().to_vec(), payload].concat();
        assert!(matches!(read_msg::<_, Response>(&mut &frame[..]), Ok(Some(Response::Chunk(d))) if d == b"xy"));
        let mut buf = Vec::new();
        assert!(matches!(read_chunk_answer(&mut &frame[..], &mut buf, 2), Ok(Some(ChunkRead::Chunk))));
        assert_eq!(buf, b"xy");
        assert!(matches!(read_chunk_answer(&mut &frame[..], &mut buf, 1), Ok(Some(ChunkRead::TooLong(2)))));
    }

    #[test]
    fn oversize_chunks_are_read_past() {
        let mut stream = encode_frame(&Response::Chunk(vec![1; 1000])).expect("encodes");
        stream.extend(encode_frame(&Response::Chunk(vec![2; 10])).expect("encodes"));
        let mut r = &stream[..];
        let mut buf = Vec::new();
        assert!(matches!(read_chunk_answer(&mut r, &mut buf, 999), Ok(Some(ChunkRead::TooLong(1000)))));
        assert!(buf.capacity() < 1000, "the long chunk was not kept");
        assert!(matches!(read_chunk_answer(&mut r, &mut buf, 999), Ok(Some(ChunkRead::Chunk))));
        assert_eq!(buf, vec![2; 10]);
        assert!(matches!(read_chunk_answer(&mut r, &mut buf, 999), Ok(None)));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut rd = &bytes[..];
            // Read until error or end: must terminate without panicking.
            for _ in 0..64 {
                match read_msg::<_, Request>(&mut rd) {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
            let mut rd = &bytes[..];
            let _ = read_msg::<_, Response>(&mut rd);
        }

        /// Whatever the bytes (valid answers, cut or bit-flipped), the
        /// chunk reader sees what `read_msg` sees, frame after frame.
        #[test]
        fn chunk_reader_agrees_with_read_msg(
            lens in proptest::collection::vec(0usize..600, 1..5),
            cut in any::<prop::sample::Index>(),
            flip in proptest::option::of((any::<prop::sample::Index>(), 1u8..=255)),
            max in 0usize..700,
        ) {
            let mut stream = Vec::new();
            for (i, len) in lens.iter().enumerate() {
                let answer = match i % 3 {
                    1 => Response::ChunkError(format!("missing {len}")),
                    _ => Response::Chunk((0..*len).map(|b| b as u8).collect()),
                };
                stream.extend(encode_frame(&answer).expect("encodes"));
            }
            if let Some((at, bits)) = flip {
                let at = at.index(stream.len());
                stream[at] ^= bits;
            }
            stream.truncate(cut.index(stream.len() + 1));
            agree(&stream, max)?;
        }

        #[test]
        fn request_reader_agrees_with_read_msg(
            reqs in proptest::collection::vec((any::<u64>(), 0usize..600, 0u8..3), 1..5),
            cut in any::<prop::sample::Index>(),
            flip in proptest::option::of((any::<prop::sample::Index>(), 1u8..=255)),
        ) {
            let mut stream = Vec::new();
            for (addr, len, kind) in reqs {
                let req = match kind {
                    0 => Request::PutChunk { addr, data: (0..len).map(|b| (b * 3) as u8).collect() },
                    1 => Request::Commit,
                    _ => Request::PruneLink { addrs: vec![addr; len % 7] },
                };
                stream.extend(encode_frame(&req).expect("encodes"));
            }
            if let Some((at, bits)) = flip {
                let at = at.index(stream.len());
                stream[at] ^= bits;
            }
            stream.truncate(cut.index(stream.len() + 1));
            agree_on_requests(&stream)?;
        }

        #[test]
        fn request_reader_agrees_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            agree_on_requests(&bytes)?;
        }

        #[test]
        fn chunk_reader_agrees_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512), max in 0usize..512) {
            agree(&bytes, max)?;
        }

        #[test]
        fn chunks_round_trip(addr in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let req = Request::PutChunk { addr, data };
            let frame = frame_of(&req);
            let got: Request = read_msg(&mut &frame[..]).expect("reads").expect("msg");
            prop_assert_eq!(got, req);
        }
    }
}
