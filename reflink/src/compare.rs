//! Which byte ranges of two reflink copies (tick, tock) may differ, from
//! their extent maps.
//!
//! The idea: a reflink copy shares its source's extents, and Btrfs and XFS
//! never change a shared extent in place: a write to it goes to a new
//! extent (copy on write). So a byte that both copies map to the same
//! physical address, at one moment, holds the same data in both; a byte
//! mapped elsewhere, or on one side only, may differ.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::fiemap::{extent_map, Extent, FIEMAP_IGNORED_FLAGS};

/// How a byte of one file is stored, as far as comparing goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No extent: reads as zeros.
    Hole,
    /// One trusted extent maps the byte to `logical + offset`
    /// (`offset = physical - logical`, exact in i128).
    Mapped(i128),
    /// No address to trust: a flag other than LAST/SHARED/MERGED (known or
    /// not), physical address 0, or several extents covering the byte.
    Suspect,
}

/// A run of bytes `[start, end)` in one state (never `Hole`).
#[derive(Clone, Copy, Debug)]
struct Seg {
    start: u64,
    end: u64,
    state: State,
}

/// The state of a byte covered by exactly this one extent.
///
/// Treated as `Suspect`, i.e. changed whatever the other side holds:
/// - UNKNOWN, DELALLOC: no address (yet).
/// - ENCODED (compressed), DATA_ENCRYPTED, NOT_ALIGNED, DATA_INLINE,
///   DATA_TAIL: `fe_physical` is not the place of this byte's data as
///   stored, or is shared with other data (inline and tail data: btrfs
///   reports physical 0 for inline extents of every file), so equal
///   addresses prove nothing.
/// - UNWRITTEN (preallocated): two unwritten extents at one address do
///   both read as zeros, so trusting them would be right as long as the
///   filesystem never writes a shared unwritten extent in place. But
///   "reads as zeros" belongs to each file's reference, not to the disk
///   bytes (btrfs writes into unshared preallocated extents in place,
///   nocow, and decides "unshared" itself), so equal addresses prove less
///   here than for written data; and a false positive costs reading zeros.
///   Not worth the risk. (XFS does not even share them: its clone leaves a
///   hole where the source has an unwritten extent.)
/// - any flag bit this crate does not know (a newer kernel's).
/// - physical address 0: no filesystem keeps file data at its first byte;
///   some report 0 for "no address" (btrfs does for inline data).
fn extent_state(e: &Extent) -> State {
    if e.flags & !FIEMAP_IGNORED_FLAGS != 0 || e.physical == 0 {
        State::Suspect
    } else {
        State::Mapped(i128::from(e.physical) - i128::from(e.logical))
    }
}

/// One side's extents as disjoint, sorted runs inside `[0, limit)`, holes
/// left out. Extents are taken as reported, however split, and clamped to
/// `limit` only. Zero-length extents are ignored; bytes under more than one
/// extent are `Suspect`.
fn segments(extents: &[Extent], limit: u64) -> Vec<Seg> {
    // (position, is_start, extent index); at equal positions ends sort
    // before starts (false < true), so abutting extents do not overlap.
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(extents.len() * 2);
    for (i, e) in extents.iter().enumerate() {
        if e.length == 0 || e.logical >= limit {
            continue;
        }
        let end = e.logical.saturating_add(e.length).min(limit);
        events.push((e.logical, true, i));
        events.push((end, false, i));
    }
    events.sort_unstable();

    let mut segs: Vec<Seg> = Vec::new();
    let mut active: BTreeSet<usize> = BTreeSet::new();
    let mut k = 0;
    while k < events.len() {
        let pos = events[k].0;
        while k < events.len() && events[k].0 == pos {
            let (_, is_start, i) = events[k];
            if is_start {
                active.insert(i);
            } else {
                active.remove(&i);
            }
            k += 1;
        }
        let Some(&(next, _, _)) = events.get(k) else { break };
        let state = match active.len() {
            0 => continue,
            1 => active.first().map_or(State::Suspect, |&i| extent_state(&extents[i])),
            _ => State::Suspect,
        };
        match segs.last_mut() {
            Some(last) if last.end == pos && last.state == state => last.end = next,
            _ => segs.push(Seg { start: pos, end: next, state }),
        }
    }
    segs
}

/// Whether a byte in state `a` on one side and `b` on the other may differ.
fn may_differ(a: State, b: State) -> bool {
    match (a, b) {
        (State::Hole, State::Hole) => false,
        (State::Mapped(x), State::Mapped(y)) => x != y,
        _ => true,
    }
}

/// Appends `[start, end)` to sorted, merged `(start, len)` ranges.
fn push_range(out: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    if start >= end {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.0 + last.1 >= start {
            last.1 = last.1.max(end - last.0);
            return;
        }
    }
    out.push((start, end - start));
}

/// Every byte range `(start, len)` of `[0, max(tick_len, tock_len))` where
/// two files with these extent maps and lengths may differ: sorted, with
/// overlapping and adjacent ranges merged. A byte below both lengths is
/// left out only if both sides leave it in a hole, or both map it, each
/// with exactly one extent without flags other than LAST, SHARED and
/// MERGED, to the same physical byte (`physical + (x - logical)`, compared
/// piecewise: the two sides may split extents differently). Everything
/// else is in: bytes mapped on one side only; bytes on different physical
/// addresses; every byte of an extent with any other flag, known or not
/// (see `extent_state`), or with physical address 0, or overlapping
/// another extent of its side; and all of `[min_len, max_len)` when the
/// lengths differ. Extents past a file's end (btrfs rounds the last one up
/// to a block) are compared as reported and marked only up to the length.
pub fn changed_ranges(tick: &[Extent], tock: &[Extent], tick_len: u64, tock_len: u64) -> Vec<(u64, u64)> {
    let min_len = tick_len.min(tock_len);
    let max_len = tick_len.max(tock_len);
    let a = segments(tick, min_len);
    let b = segments(tock, min_len);

    // The state of one side at `pos`, and where that state ends.
    fn at(segs: &[Seg], i: usize, pos: u64, limit: u64) -> (State, u64) {
        match segs.get(i) {
            Some(s) if s.start <= pos => (s.state, s.end),
            Some(s) => (State::Hole, s.start),
            None => (State::Hole, limit),
        }
    }

    let mut out = Vec::new();
    let (mut i, mut j, mut pos) = (0, 0, 0u64);
    while pos < min_len {
        let (sa, ea) = at(&a, i, pos, min_len);
        let (sb, eb) = at(&b, j, pos, min_len);
        let next = ea.min(eb);
        if may_differ(sa, sb) {
            push_range(&mut out, pos, next);
        }
        pos = next;
        if a.get(i).is_some_and(|s| s.end <= pos) {
            i += 1;
        }
        if b.get(j).is_some_and(|s| s.end <= pos) {
            j += 1;
        }
    }
    push_range(&mut out, min_len, max_len);
    out
}

/// How many times `compare_stable` reads the two maps twice before giving
/// up.
pub const STABLE_ATTEMPTS: usize = 3;

/// `compare_stable` saw an extent map change between its two readings, on
/// every attempt: the filesystem kept moving data (e.g. a btrfs balance).
/// The caller compares the files in full.
#[derive(Debug)]
pub struct UnstableMaps {
    pub tick: PathBuf,
    pub tock: PathBuf,
    pub attempts: usize,
}

impl fmt::Display for UnstableMaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the extent maps of {} and {} changed while being read, {} times in a row (the filesystem is moving data, \
             e.g. a btrfs balance); they cannot be compared by extents now",
            self.tick.display(),
            self.tock.display(),
            self.attempts
        )
    }
}

impl std::error::Error for UnstableMaps {}

/// One reading of one file: its length and extent map.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    len: u64,
    extents: Vec<Extent>,
}

impl Snapshot {
    /// Whether two readings put the same data at the same addresses. The
    /// flags that say nothing about placement are left out: SHARED comes
    /// and goes on a copy while the live volume is written (its extents stop
    /// being shared), which is no relocation and must not make the
    /// comparison give up.
    fn same_placement(&self, other: &Snapshot) -> bool {
        let key = |e: &Extent| (e.logical, e.physical, e.length, e.flags & !FIEMAP_IGNORED_FLAGS);
        self.len == other.len
            && self.extents.len() == other.extents.len()
            && self.extents.iter().zip(&other.extents).all(|(a, b)| key(a) == key(b))
    }
}

/// `changed_ranges` of the files `tick` and `tock` (two reflink copies,
/// neither written to), from extent maps that were valid together.
///
/// Why read twice: addresses are only comparable at one moment. If the
/// filesystem relocates data between the two readings (btrfs balance or
/// relocation), tick's extent may be read at its old address P, then
/// moved, and a changed extent of tock may get P before tock is read: the
/// two would look shared though they differ. So the maps are read in the
/// order tick₁, tock₁, tick₂, tock₂, each reading taking some time. If
/// tick₁ = tick₂ and tock₁ = tock₂, let m be the moment reading tock₁
/// ended. Each extent of tick was read at some moment of tick₁ (before m)
/// and again during tick₂ (after m) at the same address, so it had that
/// address at m; each extent of tock was read during tock₁ (at or before
/// m) and again during tock₂ (after m), so the same holds. Hence (tick₁,
/// tock₁) is what both maps were at the one moment m, where equal
/// addresses do mean shared data. The one thing this misses is an extent
/// moved away and back to the very same address within the window (btrfs
/// gives relocated data new, higher addresses). A difference means a move
/// inside the window: all four readings are redone, up to
/// `STABLE_ATTEMPTS` times, and then this fails with `UnstableMaps`.
///
/// The two files must be on one filesystem and, on btrfs, in one
/// subvolume (same `st_dev`): else this fails rather than compare
/// addresses of different devices.
pub fn compare_stable(tick: &Path, tock: &Path) -> Result<Vec<(u64, u64)>> {
    let tick_file = File::open(tick).with_context(|| format!("opening {}", tick.display()))?;
    let tock_file = File::open(tock).with_context(|| format!("opening {}", tock.display()))?;
    let tick_dev = tick_file.metadata().with_context(|| format!("reading {}'s metadata", tick.display()))?.dev();
    let tock_dev = tock_file.metadata().with_context(|| format!("reading {}'s metadata", tock.display()))?.dev();
    if tick_dev != tock_dev {
        bail!(
            "{} and {} are on different filesystems (or btrfs subvolumes): their extents cannot be compared",
            tick.display(),
            tock.display()
        );
    }
    let read = |file: &File, path: &Path| -> Result<Snapshot> {
        let len = file.metadata().with_context(|| format!("reading {}'s metadata", path.display()))?.len();
        let extents = extent_map(file).with_context(|| format!("reading the extent map of {}", path.display()))?;
        Ok(Snapshot { len, extents })
    };
    compare_stable_with(tick, tock, || read(&tick_file, tick), || read(&tock_file, tock))
}

/// The retry logic of `compare_stable`, over any way of reading the maps.
fn compare_stable_with(
    tick: &Path,
    tock: &Path,
    mut read_tick: impl FnMut() -> Result<Snapshot>,
    mut read_tock: impl FnMut() -> Result<Snapshot>,
) -> Result<Vec<(u64, u64)>> {
    for _ in 0..STABLE_ATTEMPTS {
        let tick1 = read_tick()?;
        let tock1 = read_tock()?;
        let tick2 = read_tick()?;
        let tock2 = read_tock()?;
        if tick1.same_placement(&tick2) && tock1.same_placement(&tock2) {
            return Ok(changed_ranges(&tick1.extents, &tock1.extents, tick1.len, tock1.len));
        }
    }
    Err(UnstableMaps { tick: tick.to_path_buf(), tock: tock.to_path_buf(), attempts: STABLE_ATTEMPTS }.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn snap(physical: u64) -> Snapshot {
        Snapshot { len: 8192, extents: vec![Extent { logical: 0, physical, length: 8192, flags: 1 }] }
    }

    #[test]
    fn a_shared_flag_that_comes_and_goes_is_no_move() {
        let calls = Cell::new(0);
        let shared = Cell::new(false);
        let flip = || {
            shared.set(!shared.get());
            let flags = if shared.get() { 1 | crate::fiemap::FIEMAP_EXTENT_SHARED } else { 1 };
            Ok(Snapshot { len: 8192, extents: vec![Extent { logical: 0, physical: 4096, length: 8192, flags }] })
        };
        let r = compare_stable_with(Path::new("tick"), Path::new("tock"), flip, || {
            calls.set(calls.get() + 1);
            Ok(snap(4096))
        });
        assert_eq!(r.ok(), Some(vec![]));
        assert_eq!(calls.get(), 2, "one attempt");
    }

    #[test]
    fn stable_maps_are_compared_once() {
        let calls = Cell::new(0);
        let r = compare_stable_with(
            Path::new("tick"),
            Path::new("tock"),
            || {
                calls.set(calls.get() + 1);
                Ok(snap(4096))
            },
            || Ok(snap(4096)),
        );
        assert_eq!(r.ok(), Some(vec![]));
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn a_map_moving_once_is_read_again() {
        // tick is relocated between its first and second reading, then
        // stays: the second attempt succeeds with the new addresses.
        let n = Cell::new(0);
        let r = compare_stable_with(
            Path::new("tick"),
            Path::new("tock"),
            || {
                n.set(n.get() + 1);
                Ok(snap(if n.get() == 1 { 4096 } else { 1 << 20 }))
            },
            || Ok(snap(1 << 20)),
        );
        assert_eq!(r.ok(), Some(vec![]));
        assert_eq!(n.get(), 4);
    }

    #[test]
    fn maps_that_keep_moving_give_up_after_three_attempts() {
        let n = Cell::new(0u64);
        let r = compare_stable_with(
            Path::new("tick"),
            Path::new("tock"),
            || {
                n.set(n.get() + 1);
                Ok(snap(4096 * n.get()))
            },
            || Ok(snap(4096)),
        );
        let err = r.err().map(|e| e.is::<UnstableMaps>());
        assert_eq!(err, Some(true));
        assert_eq!(n.get(), 2 * STABLE_ATTEMPTS as u64);
    }
}
