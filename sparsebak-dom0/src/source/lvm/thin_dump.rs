//! Streaming parser of `thin_dump --dev-id ID` XML: which blocks of one thin
//! device are mapped, so that the first send of a thin volume reads only what
//! it holds instead of its whole virtual size.
//!
//! ```text
//! <superblock ... data_block_size="128" ...>
//!   <device dev_id="7" mapped_blocks="4" ...>
//!     <range_mapping origin_begin="0" data_begin="5" length="3" time="0"/>
//!     <single_mapping origin_block="9" data_block="20" time="0"/>
//!   </device>
//! </superblock>
//! ```
//!
//! Unmapped blocks read as zeros, so skipping them is only safe when the
//! mapping is complete: the requested device must be there, once, and the
//! blocks reported must add up to its `mapped_blocks`. Anything else,
//! including the shared-subtree form (`<def>`/`<ref>`) that newer
//! thin-provisioning-tools may write, is an error, and the caller reads the
//! whole volume instead.

use std::io::BufRead;

use anyhow::{anyhow, bail, Context, Result};
use quick_xml::events::Event;
use quick_xml::Reader;

use super::thin_delta::{need_u64, SECTOR};

/// What the document said about the device, once parsing is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MappingSummary {
    /// Pool data block size in bytes.
    pub block_size: u64,
    /// Mapped blocks reported (equal to the device's `mapped_blocks`).
    pub mapped_blocks: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Superblock,
    Device,
    Done,
}

/// Parses `thin_dump` output for device `dev_id`, calling `on_mapped` with
/// each mapped run as a byte range `(start, len)`, in document order.
pub fn parse_thin_dump<R: BufRead>(
    r: R,
    dev_id: u64,
    mut on_mapped: impl FnMut(u64, u64) -> Result<()>,
) -> Result<MappingSummary> {
    let mut reader = Reader::from_reader(r);
    reader.config_mut().check_end_names = true;
    let mut buf = Vec::new();
    let mut state = State::Start;
    let mut sum = MappingSummary::default();
    let mut promised = None;
    loop {
        let pos = reader.buffer_position();
        let ev =
            reader.read_event_into(&mut buf).map_err(|e| anyhow!("malformed thin_dump XML near byte {pos}: {e}"))?;
        let (e, is_start) = match ev {
            Event::Eof => break,
            Event::Start(e) => (e, true),
            Event::Empty(e) => (e, false),
            Event::End(e) => {
                state = match (state, e.name().as_ref()) {
                    (State::Superblock, b"superblock") => State::Done,
                    (State::Device, b"device") => State::Superblock,
                    (s, n) => bail!(
                        "unexpected </{}> in thin_dump output near byte {pos} ({s:?})",
                        String::from_utf8_lossy(n)
                    ),
                };
                buf.clear();
                continue;
            }
            Event::Text(t) if t.iter().all(u8::is_ascii_whitespace) => {
                buf.clear();
                continue;
            }
            Event::Text(_) => bail!("unexpected text in thin_dump output near byte {pos}"),
            _ => {
                buf.clear();
                continue;
            }
        };
        let name = e.name();
        let name = name.as_ref();
        let ctx = || format!("thin_dump output: <{}> near byte {pos}", String::from_utf8_lossy(name));
        let mapped = |start_block: u64, blocks: u64, sum: &mut MappingSummary| -> Result<(u64, u64)> {
            let overflow = || anyhow!("mapping at block {start_block} (+{blocks}) overflows a byte offset");
            let start = start_block.checked_mul(sum.block_size).ok_or_else(overflow)?;
            let len = blocks.checked_mul(sum.block_size).ok_or_else(overflow)?;
            start.checked_add(len).ok_or_else(overflow)?;
            sum.mapped_blocks = sum.mapped_blocks.checked_add(blocks).ok_or_else(overflow)?;
            Ok((start, len))
        };
        match (state, name) {
            (State::Start, b"superblock") => {
                let sectors = need_u64(&e, "data_block_size").with_context(ctx)?;
                if sectors == 0 {
                    bail!("thin_dump output: data_block_size is 0");
                }
                sum.block_size = sectors.checked_mul(SECTOR).ok_or_else(|| anyhow!("data_block_size overflows"))?;
                state = if is_start { State::Superblock } else { State::Done };
            }
            (State::Superblock, b"device") => {
                let id = need_u64(&e, "dev_id").with_context(ctx)?;
                if id != dev_id {
                    bail!("thin_dump output is for device {id}, not {dev_id}");
                }
                if promised.is_some() {
                    bail!("thin_dump output lists device {dev_id} twice");
                }
                promised = Some(need_u64(&e, "mapped_blocks").with_context(ctx)?);
                if is_start {
                    state = State::Device;
                }
            }
            (State::Device, b"range_mapping") => {
                let (start, len) = mapped(
                    need_u64(&e, "origin_begin").with_context(ctx)?,
                    need_u64(&e, "length").with_context(ctx)?,
                    &mut sum,
                )?;
                if len > 0 {
                    on_mapped(start, len)?;
                }
            }
            (State::Device, b"single_mapping") => {
                let (start, len) = mapped(need_u64(&e, "origin_block").with_context(ctx)?, 1, &mut sum)?;
                on_mapped(start, len)?;
            }
            (_, b"def" | b"ref") => bail!("{}: shared mapping subtrees are not supported", ctx()),
            _ => bail!("{}: unexpected element here ({state:?})", ctx()),
        }
        buf.clear();
    }
    if state != State::Done {
        bail!("thin_dump output ended before </superblock> (truncated?)");
    }
    match promised {
        None => bail!("thin_dump output has no device {dev_id}"),
        Some(p) if p != sum.mapped_blocks => {
            bail!("thin_dump output: device {dev_id} has {p} mapped blocks but lists {}", sum.mapped_blocks)
        }
        Some(_) => Ok(sum),
    }
}

#[cfg(test)]
mod tests;
