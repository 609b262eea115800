//! Length-prefixed frames carrying one bincode-encoded message each.
//!
//! A frame is a 4-byte big-endian payload length followed by the payload.
//! Every frame is capped at [`MAX_FRAME`] bytes, checked before anything is
//! allocated, so a hostile peer cannot make the reader allocate without bound.

use serde::{de::DeserializeOwned, Serialize};
use std::io::{self, Read, Write};

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
    encode_frame_into(msg, &mut out)?;
    Ok(out)
}

/// Encodes `msg` as one frame into `out`, replacing what it held.
fn encode_frame_into<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let malformed = |e: bincode::error::EncodeError| FrameError::Malformed(e.to_string());
    // Measured first (cheap: a chunk's bytes are counted, not copied), so
    // that a chunk is copied once into a buffer of the right size instead of
    // through a dozen reallocations of a growing one.
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(msg, &mut size, config()).map_err(malformed)?;
    let len = size.bytes_written;
    if len > MAX_FRAME {
        return Err(FrameError::Oversize(len));
    }
    out.clear();
    out.reserve(LEN_BYTES + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    bincode::serde::encode_into_std_write(msg, &mut *out, config()).map_err(malformed)?;
    if out.len() != LEN_BYTES + len {
        return Err(FrameError::Malformed(format!("encoded {} bytes, measured {len}", out.len() - LEN_BYTES)));
    }
    Ok(())
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
pub fn write_msg<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    // One frame buffer per thread, reused: a fresh one per chunk costs page
    // faults (glibc returns buffers this large to the kernel when freed).
    thread_local! {
        static FRAME: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    /// Frame buffers kept for the next frame up to this capacity (a chunk's
    /// frame fits); a larger one, rare, is freed after use.
    const KEEP: usize = 1 << 20;
    FRAME.with(|cell| {
        let Ok(mut frame) = cell.try_borrow_mut() else {
            // Re-entered (cannot happen today): a buffer of its own.
            return w.write_all(&encode_frame(msg)?).map_err(FrameError::Io);
        };
        let result = encode_frame_into(msg, &mut frame).and_then(|()| w.write_all(&frame).map_err(FrameError::Io));
        if frame.capacity() > KEEP {
            *frame = Vec::new();
        }
        result
    })
}

/// Reads one message. Returns `Ok(None)` on a clean end of stream at a frame
/// boundary, which is how a peer says it is done.
pub fn read_msg<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<Option<T>, FrameError> {
    let mut len_buf = [0u8; LEN_BYTES];
    match read_full(r, &mut len_buf)? {
        0 => return Ok(None),
        LEN_BYTES => {}
        _ => return Err(FrameError::Truncated),
    }
    let len = u32::from_be_bytes(len_buf) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::Oversize(len));
    }
    // Decoded straight from the stream: a chunk's bytes land once, in the
    // message's own buffer, without a frame-sized buffer and a copy in
    // between. The frame's length bounds what the decoder may read.
    let mut body = r.take(len as u64);
    let decoded = bincode::serde::decode_from_std_read(&mut body, config());
    let left = body.limit();
    match decoded {
        Ok(_) if left > 0 => Err(FrameError::Malformed(format!("{left} trailing bytes after message"))),
        Ok(msg) => Ok(Some(msg)),
        Err(bincode::error::DecodeError::Io { inner, .. }) => Err(match inner.kind() {
            // The frame ended before the message did.
            io::ErrorKind::UnexpectedEof if left == 0 => FrameError::Malformed("message longer than its frame".into()),
            // The stream ended before the frame did.
            io::ErrorKind::UnexpectedEof => FrameError::Truncated,
            _ => FrameError::Io(inner),
        }),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
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

        #[test]
        fn chunks_round_trip(addr in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let req = Request::PutChunk { addr, data };
            let frame = frame_of(&req);
            let got: Request = read_msg(&mut &frame[..]).expect("reads").expect("msg");
            prop_assert_eq!(got, req);
        }
    }
}
