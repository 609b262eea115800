//! Streaming parser for the XML that `thin_delta` prints.
//!
//! `thin_delta` compares the block mappings of two thin devices in a pool's
//! metadata and prints runs of thin blocks that are the `same`, `different`
//! (mapped in both, to different data blocks), `left_only` (mapped only in the
//! left device: discarded since) or `right_only` (mapped only in the right
//! device: newly written). For sparsebak the left device is `VOL.tick` (the
//! state of the last send) and the right one `VOL.tock`; every run except
//! `same` is a change that has to be backed up (a `left_only` range now reads
//! as zeros).
//!
//! The output grows with the number of changed extents, so it is read as a
//! stream of XML events (quick-xml over a `BufRead`) and each change is handed
//! to a callback at once; nothing but the current tag is held in memory.
//!
//! Formats verified (see the tests; the 1.x writer is
//! `src/thin/delta_visitor.rs` in thin-provisioning-tools):
//!
//! * 0.9 (C++), default output:
//!   `<superblock uuid="" time="1" transaction="2" data_block_size="128"
//!   nr_data_blocks="100">` `<diff left="1" right="2">` then empty elements
//!   `<same|different|left_only|right_only begin="B" length="N"/>`.
//! * 1.x (Rust): the same element and attribute names, plus `version="2"` and
//!   sometimes `flags` on `<superblock>`; `<diff>` carries `left_root` /
//!   `right_root` instead of `left` / `right` when roots were given.
//! * `--verbose` (both): the kind is a container element and each run is a
//!   child `<range begin=".." [data_begin|left_data_begin|right_data_begin]
//!   length=".."/>`. Also accepted, although sparsebak does not ask for it.
//!
//! Units, identical in both: `begin` and `length` count pool data blocks
//! ("thin blocks"); `data_block_size` counts 512-byte sectors. The callback
//! gets byte ranges (`block * data_block_size * 512`), computed with
//! overflow checks.

use std::io::BufRead;

use anyhow::{anyhow, bail, Context, Result};
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// Size of the sector unit that `data_block_size` is expressed in.
pub(super) const SECTOR: u64 = 512;

/// Why a range counts as changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Mapped in both devices, to different data blocks (rewritten).
    Different,
    /// Mapped only in the left (older) device: discarded since, reads as zeros.
    LeftOnly,
    /// Mapped only in the right (newer) device: newly written.
    RightOnly,
}

/// One run of changed thin blocks, in bytes from the start of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangedRange {
    /// Byte offset of the first changed byte (a multiple of the block size).
    pub start: u64,
    /// Length in bytes (a non-zero multiple of the block size).
    pub len: u64,
    pub kind: ChangeKind,
}

/// What the whole document said, returned once parsing is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeltaSummary {
    /// Pool data block size in bytes (`data_block_size` * 512).
    pub block_size: u64,
    /// Thin device id on the left (`<diff left=..>`), when printed.
    pub left: Option<u64>,
    /// Thin device id on the right (`<diff right=..>`), when printed.
    pub right: Option<u64>,
    /// Number of changed ranges reported to the callback.
    pub changed_ranges: u64,
    /// Sum of the lengths of the changed ranges, in bytes.
    pub changed_bytes: u64,
    /// Sum of the lengths of the `same` ranges, in bytes.
    pub same_bytes: u64,
}

/// What a `<range>` child means in `--verbose` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Same,
    Changed(ChangeKind),
}

fn kind_of(name: &[u8]) -> Option<Container> {
    match name {
        b"same" => Some(Container::Same),
        b"different" => Some(Container::Changed(ChangeKind::Different)),
        b"left_only" => Some(Container::Changed(ChangeKind::LeftOnly)),
        b"right_only" => Some(Container::Changed(ChangeKind::RightOnly)),
        _ => None,
    }
}

/// Where the parser is in the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before `<superblock>`.
    Start,
    /// Inside `<superblock>`, outside `<diff>`.
    Superblock,
    /// Inside `<diff>`, optionally inside a verbose kind container.
    Diff(Option<Container>),
    /// After `</superblock>`: only whitespace may follow.
    Done,
}

/// Reads the named attribute as a decimal u64 (None when absent).
fn attr_u64(e: &BytesStart<'_>, name: &str) -> Result<Option<u64>> {
    for a in e.attributes() {
        let a = a.with_context(|| format!("bad attribute in <{}>", String::from_utf8_lossy(e.name().as_ref())))?;
        if a.key.as_ref() == name.as_bytes() {
            let text = std::str::from_utf8(&a.value).map_err(|_| anyhow!("attribute {name} is not UTF-8"))?;
            let v = text
                .trim()
                .parse::<u64>()
                .map_err(|_| anyhow!("attribute {name}={text:?} is not a non-negative integer"))?;
            return Ok(Some(v));
        }
    }
    Ok(None)
}

pub(super) fn need_u64(e: &BytesStart<'_>, name: &str) -> Result<u64> {
    attr_u64(e, name)?
        .ok_or_else(|| anyhow!("<{}> lacks the {name} attribute", String::from_utf8_lossy(e.name().as_ref())))
}

/// Parses `thin_delta` output from `r`, calling `on_change` for every
/// `different`, `left_only` and `right_only` run (in document order, which is
/// ascending block order), and returns the summary once `</superblock>` was
/// read.
///
/// Errors (each names what was wrong and the byte position): malformed XML,
/// output that ends before `</superblock>` (a killed `thin_delta`), a missing
/// or zero `data_block_size`, a range element outside `<diff>`, a range
/// without `begin`/`length`, and ranges whose byte offsets overflow u64. An
/// error returned by `on_change` stops parsing and is passed on.
pub fn parse_thin_delta<R: BufRead>(
    r: R,
    mut on_change: impl FnMut(ChangedRange) -> Result<()>,
) -> Result<DeltaSummary> {
    let mut reader = Reader::from_reader(r);
    reader.config_mut().check_end_names = true;
    let mut buf = Vec::new();
    let mut state = State::Start;
    let mut sum = DeltaSummary::default();
    loop {
        let pos = reader.buffer_position();
        let ev =
            reader.read_event_into(&mut buf).map_err(|e| anyhow!("malformed thin_delta XML near byte {pos}: {e}"))?;
        let (elem, is_start) = match ev {
            Event::Eof => break,
            Event::Start(e) => (Some(e), true),
            Event::Empty(e) => (Some(e), false),
            Event::End(e) => {
                let name = e.name();
                state = match (state, name.as_ref()) {
                    (State::Superblock, b"superblock") => State::Done,
                    (State::Diff(None), b"diff") => State::Superblock,
                    (State::Diff(Some(_)), n) if kind_of(n).is_some() => State::Diff(None),
                    (State::Diff(Some(c)), b"range") => State::Diff(Some(c)),
                    (s, n) => bail!(
                        "unexpected </{}> in thin_delta output near byte {pos} (state {s:?})",
                        String::from_utf8_lossy(n)
                    ),
                };
                (None, false)
            }
            Event::Text(t) => {
                if t.iter().any(|b| !b.is_ascii_whitespace()) {
                    bail!("unexpected text in thin_delta output near byte {pos}");
                }
                (None, false)
            }
            // Declarations, comments, doctype, processing instructions: skip.
            _ => (None, false),
        };
        let Some(e) = elem else {
            buf.clear();
            continue;
        };
        let name = e.name();
        let name = name.as_ref();
        let ctx = || format!("thin_delta output: <{}> near byte {pos}", String::from_utf8_lossy(name));
        match (state, name) {
            (State::Start, b"superblock") => {
                let sectors = attr_u64(&e, "data_block_size")
                    .with_context(ctx)?
                    .ok_or_else(|| anyhow!("thin_delta output: <superblock> has no data_block_size"))?;
                if sectors == 0 {
                    bail!("thin_delta output: data_block_size is 0");
                }
                sum.block_size = sectors
                    .checked_mul(SECTOR)
                    .ok_or_else(|| anyhow!("thin_delta output: data_block_size {sectors} sectors overflows"))?;
                state = if is_start { State::Superblock } else { State::Done };
            }
            (State::Superblock, b"diff") => {
                sum.left = attr_u64(&e, "left").with_context(ctx)?;
                sum.right = attr_u64(&e, "right").with_context(ctx)?;
                if is_start {
                    state = State::Diff(None);
                }
            }
            (State::Diff(None), n) if kind_of(n).is_some() => {
                let kind = kind_of(n).ok_or_else(|| anyhow!("unreachable"))?;
                if attr_u64(&e, "begin").with_context(ctx)?.is_some() {
                    // Default format: the element is the range.
                    handle_range(&e, kind, &mut sum, &mut on_change).with_context(ctx)?;
                    if is_start {
                        // Not produced by any known version; tolerate children.
                        state = State::Diff(Some(kind));
                    }
                } else if is_start {
                    // --verbose format: a container of <range> children.
                    state = State::Diff(Some(kind));
                }
                // An empty container without begin carries nothing.
            }
            (State::Diff(Some(kind)), b"range") => {
                handle_range(&e, kind, &mut sum, &mut on_change).with_context(ctx)?;
                if is_start {
                    bail!("{}: <range> must be an empty element", ctx());
                }
            }
            _ => bail!("{}: unexpected element here (state {state:?})", ctx()),
        }
        buf.clear();
    }
    match state {
        State::Done => Ok(sum),
        State::Start => bail!("thin_delta output is empty or has no <superblock>"),
        _ => bail!("thin_delta output ended before </superblock> (truncated?)"),
    }
}

fn handle_range(
    e: &BytesStart<'_>,
    kind: Container,
    sum: &mut DeltaSummary,
    on_change: &mut impl FnMut(ChangedRange) -> Result<()>,
) -> Result<()> {
    if sum.block_size == 0 {
        bail!("range before the data block size is known");
    }
    let begin = need_u64(e, "begin")?;
    let length = need_u64(e, "length")?;
    let overflow = || anyhow!("range begin={begin} length={length} overflows a byte offset");
    let start = begin.checked_mul(sum.block_size).ok_or_else(overflow)?;
    let len = length.checked_mul(sum.block_size).ok_or_else(overflow)?;
    start.checked_add(len).ok_or_else(overflow)?;
    match kind {
        Container::Same => {
            sum.same_bytes = sum.same_bytes.saturating_add(len);
        }
        Container::Changed(kind) => {
            if len == 0 {
                return Ok(());
            }
            sum.changed_ranges += 1;
            sum.changed_bytes = sum.changed_bytes.saturating_add(len);
            on_change(ChangedRange { start, len, kind })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
