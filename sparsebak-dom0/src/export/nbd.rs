//! A read-only NBD server for one export, over any stream (a Unix socket in
//! `sparsebak export`). The protocol, as in the NBD specification
//! (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md):
//!
//! - fixed newstyle handshake, `NBD_FLAG_NO_ZEROES` honoured;
//! - options `NBD_OPT_GO`, `NBD_OPT_INFO` (export size and flags, block
//!   sizes when asked), `NBD_OPT_LIST`, `NBD_OPT_ABORT`, and the old
//!   `NBD_OPT_EXPORT_NAME`; any other option is answered `NBD_REP_ERR_UNSUP`
//!   (so structured replies are never used: simple replies only);
//! - commands `NBD_CMD_READ` and `NBD_CMD_DISC`; `WRITE`, `TRIM` and
//!   `WRITE_ZEROES` are answered `EPERM` (the export is read-only, and says
//!   so in its flags), `FLUSH` succeeds (nothing to flush), anything else is
//!   `EINVAL`.
//!
//! The export name is the volume's name; the empty (default) name serves it
//! too. Everything the client sends is bounded: option data and reads are
//! capped, and a client that breaks the protocol is disconnected.

use std::io::{self, Read, Write};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_FIXED_NEWSTYLE: u32 = 1;
const CLIENT_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TRANS_HAS_FLAGS: u16 = 1;
const TRANS_READ_ONLY: u16 = 2;
const TRANS_SEND_FLUSH: u16 = 4;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

/// Errors as NBD numbers them (the Linux values).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;

/// Longest option payload accepted (names are short).
const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Largest read served in one request (clients split bigger ones; the
/// spec's recommended maximum is 32 MiB).
pub const MAX_READ: u32 = 32 << 20;

/// What the server serves.
pub trait Export {
    fn name(&self) -> &str;
    fn size(&self) -> u64;
    /// The block size clients should prefer (the archive's chunk size).
    fn preferred_block(&self) -> u32;
    /// Reads `buf.len()` bytes at `offset` (within the size); an error is an
    /// NBD error number for that request only (`EIO` for a bad chunk).
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), u32>;
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// `NBD_CMD_DISC`, `NBD_OPT_ABORT`, or the client closed the socket.
    Disconnected,
}

/// Serves one client until it disconnects. An I/O error or a protocol
/// violation ends the connection with an error.
pub fn serve(stream: &mut (impl Read + Write), export: &mut dyn Export) -> io::Result<End> {
    match handshake(stream, export)? {
        Some(()) => transmission(stream, export),
        None => Ok(End::Disconnected),
    }
}

/// The handshake and option haggling: `Some` once the client asked to go
/// into transmission, `None` when it aborted or went away.
fn handshake(stream: &mut (impl Read + Write), export: &mut dyn Export) -> io::Result<Option<()>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&hello)?;
    stream.flush()?;
    let client_flags = read_u32(stream)?;
    if client_flags & CLIENT_FIXED_NEWSTYLE == 0 || client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(protocol(format!("client flags {client_flags:#x} not supported")));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    loop {
        let magic = match read_u64(stream) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        };
        if magic != IHAVEOPT {
            return Err(protocol(format!("bad option magic {magic:#x}")));
        }
        let option = read_u32(stream)?;
        let len = read_u32(stream)?;
        if len > MAX_OPTION_DATA {
            return Err(protocol(format!("option data of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data)?;
        match option {
            OPT_ABORT => {
                option_reply(stream, option, REP_ACK, &[])?;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(stream, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                let name = export.name().as_bytes();
                let mut server = (name.len() as u32).to_be_bytes().to_vec();
                server.extend_from_slice(name);
                option_reply(stream, option, REP_SERVER, &server)?;
                option_reply(stream, option, REP_ACK, &[])?;
            }
            OPT_EXPORT_NAME => {
                // The old way into transmission: no error reply possible, so
                // an unknown name closes the connection.
                if !names_export(&data, export) {
                    return Err(protocol("unknown export name".into()));
                }
                let mut reply = export.size().to_be_bytes().to_vec();
                reply.extend_from_slice(&transmission_flags().to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&reply)?;
                stream.flush()?;
                return Ok(Some(()));
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                None => option_reply(stream, option, REP_ERR_INVALID, b"malformed request")?,
                Some((name, _)) if !names_export(name, export) => {
                    option_reply(stream, option, REP_ERR_UNKNOWN, b"no such export")?
                }
                Some((_, requests)) => {
                    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&export.size().to_be_bytes());
                    info.extend_from_slice(&transmission_flags().to_be_bytes());
                    option_reply(stream, option, REP_INFO, &info)?;
                    if requests.contains(&INFO_BLOCK_SIZE) {
                        let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        info.extend_from_slice(&1u32.to_be_bytes());
                        info.extend_from_slice(&export.preferred_block().to_be_bytes());
                        info.extend_from_slice(&MAX_READ.to_be_bytes());
                        option_reply(stream, option, REP_INFO, &info)?;
                    }
                    option_reply(stream, option, REP_ACK, &[])?;
                    if option == OPT_GO {
                        return Ok(Some(()));
                    }
                }
            },
            _ => option_reply(stream, option, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

/// Not `CAN_MULTI_CONN`: one client is served at a time, and a client
/// that opened several connections at once (nbdcopy does when allowed)
/// would wait forever for the second handshake.
fn transmission_flags() -> u16 {
    TRANS_HAS_FLAGS | TRANS_READ_ONLY | TRANS_SEND_FLUSH
}

/// The empty name is the default export.
fn names_export(name: &[u8], export: &dyn Export) -> bool {
    name.is_empty() || name == export.name().as_bytes()
}

/// `NBD_OPT_INFO`/`GO` data: name length, name, count of info requests,
/// the requests.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..)?;
    if list.len() != count * 2 {
        return None;
    }
    Some((name, list.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
}

fn option_reply(stream: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut reply = Vec::with_capacity(20 + data.len());
    reply.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    reply.extend_from_slice(&option.to_be_bytes());
    reply.extend_from_slice(&kind.to_be_bytes());
    reply.extend_from_slice(&(data.len() as u32).to_be_bytes());
    reply.extend_from_slice(data);
    stream.write_all(&reply)?;
    stream.flush()
}

/// Requests until the client disconnects.
fn transmission(stream: &mut (impl Read + Write), export: &mut dyn Export) -> io::Result<End> {
    let mut buf = Vec::new();
    loop {
        let mut head = [0u8; 28];
        match stream.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(End::Disconnected),
            Err(e) => return Err(e),
        }
        let magic = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        if magic != REQUEST_MAGIC {
            return Err(protocol(format!("bad request magic {magic:#x}")));
        }
        let kind = u16::from_be_bytes([head[6], head[7]]);
        let handle: [u8; 8] = head[8..16].try_into().unwrap_or_default();
        let offset = u64::from_be_bytes(head[16..24].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(head[24..28].try_into().unwrap_or_default());
        match kind {
            CMD_DISC => return Ok(End::Disconnected),
            CMD_READ => {
                let in_bounds = offset.checked_add(u64::from(len)).is_some_and(|end| end <= export.size());
                if !in_bounds || len > MAX_READ {
                    simple_reply(stream, handle, EINVAL, &[])?;
                    continue;
                }
                buf.resize(len as usize, 0);
                match export.read(offset, &mut buf) {
                    Ok(()) => simple_reply(stream, handle, 0, &buf)?,
                    Err(errno) => simple_reply(stream, handle, errno, &[])?,
                }
            }
            CMD_WRITE => {
                // The payload follows the request: read it past, then refuse.
                if len > MAX_READ {
                    return Err(protocol(format!("write of {len} bytes")));
                }
                io::copy(&mut Read::by_ref(stream).take(u64::from(len)), &mut io::sink())?;
                simple_reply(stream, handle, EPERM, &[])?;
            }
            CMD_TRIM | CMD_WRITE_ZEROES => simple_reply(stream, handle, EPERM, &[])?,
            CMD_FLUSH => simple_reply(stream, handle, 0, &[])?,
            _ => simple_reply(stream, handle, EINVAL, &[])?,
        }
    }
}

fn simple_reply(stream: &mut impl Write, handle: [u8; 8], error: u32, data: &[u8]) -> io::Result<()> {
    let mut head = [0u8; 16];
    head[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    head[4..8].copy_from_slice(&error.to_be_bytes());
    head[8..].copy_from_slice(&handle);
    stream.write_all(&head)?;
    stream.write_all(data)?;
    stream.flush()
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn protocol(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("NBD client broke the protocol: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pattern;

    impl Export for Pattern {
        fn name(&self) -> &str {
            "vol"
        }
        fn size(&self) -> u64 {
            1 << 20
        }
        fn preferred_block(&self) -> u32 {
            131072
        }
        fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), u32> {
            if (4096..8192).contains(&offset) {
                return Err(EIO);
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8;
            }
            Ok(())
        }
    }

    /// A client script as bytes in, the server's output out.
    struct Duplex {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn option(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn request(kind: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&0u16.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    fn go(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        option(OPT_GO, &d)
    }

    fn run(script: Vec<u8>) -> (io::Result<End>, Vec<u8>) {
        let mut d = Duplex { input: io::Cursor::new(script), output: Vec::new() };
        let r = serve(&mut d, &mut Pattern);
        (r, d.output)
    }

    #[test]
    fn go_read_write_and_disconnect() {
        let mut s = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes().to_vec();
        s.extend(option(99, &[]));
        s.extend(go("nope", &[]));
        s.extend(go("", &[INFO_BLOCK_SIZE]));
        s.extend(request(CMD_READ, 7, 100, 16));
        s.extend(request(CMD_READ, 8, 4096, 16));
        s.extend(request(CMD_READ, 9, (1 << 20) - 8, 16));
        let mut w = request(CMD_WRITE, 10, 0, 3);
        w.extend_from_slice(b"abc");
        s.extend(w);
        s.extend(request(CMD_TRIM, 11, 0, 4096));
        s.extend(request(CMD_DISC, 12, 0, 0));
        let (r, out) = run(s);
        assert_eq!(r.expect("clean end"), End::Disconnected);
        assert_eq!(&out[..8], &NBDMAGIC.to_be_bytes());
        let mut at = 18;
        let mut reply = |want_kind: u32| -> Vec<u8> {
            assert_eq!(&out[at..at + 8], &REPLY_MAGIC.to_be_bytes(), "option reply at {at}");
            let kind = u32::from_be_bytes(out[at + 12..at + 16].try_into().expect("4"));
            let len = u32::from_be_bytes(out[at + 16..at + 20].try_into().expect("4")) as usize;
            assert_eq!(kind, want_kind);
            let data = out[at + 20..at + 20 + len].to_vec();
            at += 20 + len;
            data
        };
        reply(REP_ERR_UNSUP);
        reply(REP_ERR_UNKNOWN);
        let export = reply(REP_INFO);
        assert_eq!(u64::from_be_bytes(export[2..10].try_into().expect("8")), 1 << 20);
        let flags = u16::from_be_bytes(export[10..12].try_into().expect("2"));
        assert_ne!(flags & TRANS_READ_ONLY, 0, "read-only");
        let block = reply(REP_INFO);
        assert_eq!(u16::from_be_bytes(block[..2].try_into().expect("2")), INFO_BLOCK_SIZE);
        assert_eq!(u32::from_be_bytes(block[6..10].try_into().expect("4")), 131072);
        reply(REP_ACK);
        let mut simple = |handle: u64, data_len: usize| -> (u32, Vec<u8>) {
            assert_eq!(&out[at..at + 4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
            let err = u32::from_be_bytes(out[at + 4..at + 8].try_into().expect("4"));
            assert_eq!(&out[at + 8..at + 16], &handle.to_be_bytes());
            let len = if err == 0 { data_len } else { 0 };
            let data = out[at + 16..at + 16 + len].to_vec();
            at += 16 + len;
            (err, data)
        };
        let (err, data) = simple(7, 16);
        assert_eq!(err, 0);
        assert_eq!(data[0], 100, "byte 100 of the pattern");
        assert_eq!(simple(8, 16).0, EIO, "a bad range fails alone");
        assert_eq!(simple(9, 16).0, EINVAL, "past the end");
        assert_eq!(simple(10, 0).0, EPERM, "write refused, payload skipped");
        assert_eq!(simple(11, 0).0, EPERM, "trim refused");
        assert_eq!(at, out.len(), "nothing else was sent");
    }

    #[test]
    fn list_abort_and_broken_clients() {
        let mut s = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        s.extend(option(OPT_LIST, &[]));
        s.extend(option(OPT_ABORT, &[]));
        let (r, out) = run(s);
        assert_eq!(r.expect("aborted"), End::Disconnected);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("vol"), "the export is listed");
        // Not fixed newstyle; oversized option data; bad request magic.
        assert!(run(0u32.to_be_bytes().to_vec()).0.is_err());
        let mut s = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        s.extend(IHAVEOPT.to_be_bytes());
        s.extend(OPT_GO.to_be_bytes());
        s.extend(u32::MAX.to_be_bytes());
        assert!(run(s).0.is_err());
        let mut s = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        s.extend(go("vol", &[]));
        s.extend([0u8; 28]);
        assert!(run(s).0.is_err());
    }

    #[test]
    fn export_name_option_with_and_without_zeroes() {
        let mut s = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        s.extend(option(OPT_EXPORT_NAME, b"vol"));
        let (r, out) = run(s);
        assert_eq!(r.expect("then EOF"), End::Disconnected);
        assert_eq!(out.len(), 18 + 8 + 2 + 124);
        let mut s = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes().to_vec();
        s.extend(option(OPT_EXPORT_NAME, b"other"));
        assert!(run(s).0.is_err(), "unknown name closes the connection");
    }
}
