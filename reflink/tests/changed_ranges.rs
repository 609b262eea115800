//! `changed_ranges`: hand-written cases, and property tests against a
//! brute-force per-byte model of "may differ".

use proptest::prelude::*;
use sparsebak_reflink::{
    changed_ranges, Extent, FIEMAP_EXTENT_DATA_INLINE, FIEMAP_EXTENT_DELALLOC, FIEMAP_EXTENT_ENCODED,
    FIEMAP_EXTENT_LAST, FIEMAP_EXTENT_MERGED, FIEMAP_EXTENT_NOT_ALIGNED, FIEMAP_EXTENT_SHARED, FIEMAP_EXTENT_UNKNOWN,
    FIEMAP_EXTENT_UNWRITTEN,
};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;
const P: u64 = 1 << 30;

fn ext(logical: u64, physical: u64, length: u64, flags: u32) -> Extent {
    Extent { logical, physical, length, flags }
}

#[test]
fn identical_maps_have_no_change() {
    let map = [ext(0, P, M, FIEMAP_EXTENT_SHARED), ext(M, 3 * P, M, FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_LAST)];
    assert_eq!(changed_ranges(&map, &map, 2 * M, 2 * M), vec![]);
    assert_eq!(changed_ranges(&[], &[], 0, 0), vec![]);
    assert_eq!(changed_ranges(&[], &[], M, M), vec![], "both all holes");
}

#[test]
fn extents_split_differently_over_the_same_addresses_are_equal() {
    let tick = [ext(0, P, M, FIEMAP_EXTENT_LAST)];
    let tock = [
        ext(0, P, 300 * K, FIEMAP_EXTENT_SHARED),
        ext(300 * K, P + 300 * K, 100 * K, FIEMAP_EXTENT_MERGED),
        ext(400 * K, P + 400 * K, 624 * K, FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_SHARED),
    ];
    assert_eq!(changed_ranges(&tick, &tock, M, M), vec![]);
    assert_eq!(changed_ranges(&tock, &tick, M, M), vec![]);
}

#[test]
fn a_rewritten_piece_is_found() {
    let tick = [ext(0, P, M, 0)];
    let tock = [ext(0, P, 64 * K, 0), ext(64 * K, 5 * P, 4 * K, 0), ext(68 * K, P + 68 * K, M - 68 * K, 0)];
    assert_eq!(changed_ranges(&tick, &tock, M, M), vec![(64 * K, 4 * K)]);
}

#[test]
fn a_shifted_physical_address_is_a_change() {
    // Same length, same split, physical off by one block: every byte differs.
    let tick = [ext(0, P, 64 * K, 0)];
    let tock = [ext(0, P + 4 * K, 64 * K, 0)];
    assert_eq!(changed_ranges(&tick, &tock, 64 * K, 64 * K), vec![(0, 64 * K)]);
    // Same physical start, shifted logical start: also every byte.
    let tock = [ext(4 * K, P, 60 * K, 0), ext(0, 7 * P, 4 * K, 0)];
    assert_eq!(changed_ranges(&tick, &tock, 64 * K, 64 * K), vec![(0, 64 * K)]);
}

#[test]
fn hole_against_data_is_a_change_and_hole_against_hole_is_not() {
    let tick = [ext(0, P, 64 * K, 0), ext(128 * K, P + 128 * K, 64 * K, 0)];
    let tock = [ext(0, P, 64 * K, 0), ext(64 * K, 2 * P, 32 * K, 0), ext(128 * K, P + 128 * K, 32 * K, 0)];
    // [64K, 96K): data on tock only; [96K, 128K) hole on both;
    // [160K, 192K): data on tick only (punched on tock); [192K, 256K): holes.
    assert_eq!(changed_ranges(&tick, &tock, 256 * K, 256 * K), vec![(64 * K, 32 * K), (160 * K, 32 * K)]);
}

#[test]
fn a_size_change_marks_everything_between_the_lengths() {
    let map = [ext(0, P, 64 * K, 0)];
    // Extended (by set_len: a hole at the end), both ways round.
    assert_eq!(changed_ranges(&map, &map, 64 * K, 100 * K), vec![(64 * K, 36 * K)]);
    assert_eq!(changed_ranges(&map, &map, 100 * K, 64 * K), vec![(64 * K, 36 * K)]);
    // Truncated inside the extent; the tail of the extent is past the end.
    assert_eq!(changed_ranges(&map, &map, 64 * K, 10_000), vec![(10_000, 64 * K - 10_000)]);
    // From or to empty.
    assert_eq!(changed_ranges(&[], &map, 0, 64 * K), vec![(0, 64 * K)]);
}

#[test]
fn flagged_extents_are_marked_whole_on_both_sides() {
    let plain = [ext(0, P, 64 * K, 0), ext(64 * K, P + 64 * K, 64 * K, 0), ext(128 * K, P + 128 * K, 64 * K, 0)];
    for flag in [
        FIEMAP_EXTENT_UNKNOWN,
        FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_UNKNOWN,
        FIEMAP_EXTENT_ENCODED,
        FIEMAP_EXTENT_UNWRITTEN,
        FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_NOT_ALIGNED,
        0x4000,
        1 << 31,
    ] {
        let mut flagged = plain;
        flagged[1].flags |= flag;
        let want = vec![(64 * K, 64 * K)];
        assert_eq!(changed_ranges(&plain, &flagged, 192 * K, 192 * K), want, "flag {flag:#x} on tock");
        assert_eq!(changed_ranges(&flagged, &plain, 192 * K, 192 * K), want, "flag {flag:#x} on tick");
        assert_eq!(changed_ranges(&flagged, &flagged, 192 * K, 192 * K), want, "flag {flag:#x} on both");
    }
}

#[test]
fn a_flagged_extent_marks_its_whole_range_even_over_the_other_sides_split() {
    // tock's compressed extent spans what tick has as three extents.
    let tick = [ext(0, P, 4 * K, 0), ext(4 * K, P + 4 * K, 4 * K, 0), ext(8 * K, P + 8 * K, 4 * K, 0)];
    let tock = [ext(0, P, 2 * K, 0), ext(2 * K, 9 * P, 128 * K, FIEMAP_EXTENT_ENCODED)];
    assert_eq!(changed_ranges(&tick, &tock, 12 * K, 12 * K), vec![(2 * K, 10 * K)]);
}

#[test]
fn btrfs_inline_extents_at_physical_zero_are_a_change() {
    let inline = [ext(0, 0, 4096, FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_NOT_ALIGNED | FIEMAP_EXTENT_DATA_INLINE)];
    assert_eq!(changed_ranges(&inline, &inline, 5, 5), vec![(0, 5)]);
    // Physical 0 without a flag is not trusted either.
    let zero = [ext(0, 0, 4096, 0)];
    assert_eq!(changed_ranges(&zero, &zero, 4096, 4096), vec![(0, 4096)]);
}

#[test]
fn extents_past_the_end_are_compared_as_reported_and_marked_up_to_the_length() {
    // btrfs rounds the last extent up to a block: 5000 bytes, extent 8192.
    let tick = [ext(0, P, 8192, FIEMAP_EXTENT_LAST)];
    assert_eq!(changed_ranges(&tick, &tick, 5000, 5000), vec![]);
    // tock differs from byte 4096 of its last extent: within the length.
    let tock = [ext(0, P, 4096, 0), ext(4096, 2 * P, 4096, FIEMAP_EXTENT_LAST)];
    assert_eq!(changed_ranges(&tick, &tock, 5000, 5000), vec![(4096, 904)]);
    // ... and not when both files end at 4096.
    assert_eq!(changed_ranges(&tick, &tock, 4096, 4096), vec![]);
    // A flagged extent wholly past the end marks nothing.
    let tock = [ext(0, P, 4096, 0), ext(8192, 0, 4096, FIEMAP_EXTENT_ENCODED)];
    assert_eq!(changed_ranges(&tick, &tock, 4096, 4096), vec![]);
    // Extents at the end of the address space do not overflow.
    let (far, end) = ([ext(0, P, u64::MAX, 0), ext(u64::MAX - 10, 2 * P, 100, 0)], u64::MAX - 5);
    assert_eq!(changed_ranges(&far, &far, end, end), vec![(u64::MAX - 10, 5)], "overlap at the far end");
    assert_eq!(changed_ranges(&far[..1], &far[..1], end, u64::MAX), vec![(end, 5)]);
}

#[test]
fn overlapping_extents_of_one_side_are_a_change() {
    let tick = [ext(0, P, 64 * K, 0)];
    let tock = [ext(0, P, 64 * K, 0), ext(16 * K, P + 16 * K, 4 * K, 0)];
    assert_eq!(changed_ranges(&tick, &tock, 64 * K, 64 * K), vec![(16 * K, 4 * K)]);
    // A verbatim duplicate is an overlap too (extent_map drops those).
    let dup = [ext(0, P, 64 * K, 0), ext(0, P, 64 * K, 0)];
    assert_eq!(changed_ranges(&tick, &dup, 64 * K, 64 * K), vec![(0, 64 * K)]);
}

#[test]
fn adjacent_changes_are_merged_and_extents_may_come_unsorted() {
    let tick = [ext(8 * K, P + 8 * K, 8 * K, 0), ext(0, P, 8 * K, 0)];
    let tock = [
        ext(4 * K, 3 * P, 4 * K, 0),
        ext(0, P, 4 * K, 0),
        ext(8 * K, 4 * P, 4 * K, 0),
        ext(12 * K, P + 12 * K, 4 * K, 0),
    ];
    assert_eq!(changed_ranges(&tick, &tock, 16 * K, 16 * K), vec![(4 * K, 8 * K)]);
}

// ---- property tests against a per-byte model ----

/// How the model sees one byte of one side.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Byte {
    Hole,
    At(i128),
    Suspect,
}

fn model_byte(map: &[Extent], x: u64) -> Byte {
    let covering: Vec<&Extent> =
        map.iter().filter(|e| e.length > 0 && e.logical <= x && x - e.logical < e.length).collect();
    match covering.as_slice() {
        [] => Byte::Hole,
        [e] => {
            let ignored = FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_MERGED;
            if e.flags & !ignored != 0 || e.physical == 0 {
                Byte::Suspect
            } else {
                Byte::At(i128::from(e.physical) + i128::from(x - e.logical))
            }
        }
        _ => Byte::Suspect,
    }
}

/// Whether byte `x` may differ, per the definition, byte by byte.
fn model_marked(tick: &[Extent], tock: &[Extent], tick_len: u64, tock_len: u64, x: u64) -> bool {
    if x >= tick_len.min(tock_len) {
        return x < tick_len.max(tock_len);
    }
    match (model_byte(tick, x), model_byte(tock, x)) {
        (Byte::Hole, Byte::Hole) => false,
        (Byte::At(a), Byte::At(b)) => a != b,
        _ => true,
    }
}

/// The ranges as a per-byte bitmap of `[0, len)`, after checking that they
/// are sorted, non-empty, merged and inside it.
fn bitmap(ranges: &[(u64, u64)], len: u64) -> Vec<bool> {
    let mut bits = vec![false; len as usize];
    let mut prev_end = None;
    for &(start, n) in ranges {
        assert!(n > 0, "empty range in {ranges:?}");
        if let Some(end) = prev_end {
            assert!(start > end, "unsorted or unmerged: {ranges:?}");
        }
        assert!(start + n <= len, "range past the longer file: {ranges:?}");
        bits[start as usize..(start + n) as usize].fill(true);
        prev_end = Some(start + n);
    }
    bits
}

fn flags() -> impl Strategy<Value = u32> {
    prop_oneof![
        8 => Just(0),
        2 => Just(FIEMAP_EXTENT_LAST),
        3 => Just(FIEMAP_EXTENT_SHARED),
        1 => Just(FIEMAP_EXTENT_MERGED | FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_LAST),
        1 => Just(FIEMAP_EXTENT_UNWRITTEN),
        1 => Just(FIEMAP_EXTENT_ENCODED | FIEMAP_EXTENT_SHARED),
        1 => Just(FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_UNKNOWN),
        1 => Just(FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_NOT_ALIGNED),
        1 => Just(1 << 20),
    ]
}

/// Extents in units of `unit` bytes: logical in [0, 40), length in [0, 12),
/// physical = logical + one of a few offsets, so that addresses coincide
/// often; now and then physical 0.
fn extent(unit: u64) -> impl Strategy<Value = Extent> {
    (0..40u64, 0..12u64, prop_oneof![4 => Just(1000u64), 2 => Just(1001), 2 => Just(2000), 1 => Just(0)], flags())
        .prop_map(move |(l, n, off, flags)| Extent {
            logical: l * unit,
            physical: if off == 0 { 0 } else { (l + off) * unit },
            length: n * unit,
            flags,
        })
}

/// A tock derived from a tick the way files change: each extent kept,
/// split (same addresses), split with one piece moved, dropped (a hole),
/// or reflagged; plus a few new extents.
fn derive(tick: &[Extent], ops: &[(u8, u64, u64)], extra: &[Extent], unit: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    for (e, &(op, at, to)) in tick.iter().zip(ops.iter().cycle()) {
        let blocks = e.length / unit;
        let cut = if blocks == 0 { 0 } else { at % blocks * unit };
        let (left, right) = (
            Extent { length: cut, ..*e },
            Extent { logical: e.logical + cut, physical: e.physical + cut, length: e.length - cut, flags: e.flags },
        );
        match op % 7 {
            0 | 1 => out.push(*e),
            2 => out.extend([left, right]),
            3 => out.extend([left, Extent { physical: (to % 3000 + 1) * unit, ..right }]),
            4 => {}
            5 => out.push(Extent { flags: e.flags ^ FIEMAP_EXTENT_SHARED, ..*e }),
            _ => out.push(Extent { flags: FIEMAP_EXTENT_UNWRITTEN, ..*e }),
        }
    }
    out.retain(|e| e.length > 0 || e.logical % 2 == 0);
    out.extend_from_slice(extra);
    out
}

fn case(unit: u64) -> impl Strategy<Value = (Vec<Extent>, Vec<Extent>, u64, u64)> {
    let maps = prop_oneof![
        // Independent maps.
        (prop::collection::vec(extent(unit), 0..8), prop::collection::vec(extent(unit), 0..8)),
        // Tock derived from tick (non-overlapping tick, mostly).
        (
            prop::collection::vec(extent(unit), 0..8),
            prop::collection::vec((any::<u8>(), any::<u64>(), any::<u64>()), 1..8),
            prop::collection::vec(extent(unit), 0..2),
        )
            .prop_map(move |(tick, ops, extra)| {
                let tock = derive(&tick, &ops, &extra, unit);
                (tick, tock)
            }),
    ];
    // Lengths in bytes, not in units: file ends fall inside extents.
    (maps, 0..60 * unit, 0..60 * unit, any::<bool>())
        .prop_map(|((tick, tock), a, b, same)| (tick, tock, a, if same { a } else { b }))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Byte scale: every byte checked against the model; the result must be
    /// exactly the set of bytes that may differ.
    #[test]
    fn matches_the_byte_model_exactly((tick, tock, tick_len, tock_len) in case(1)) {
        let got = changed_ranges(&tick, &tock, tick_len, tock_len);
        let max = tick_len.max(tock_len);
        let bits = bitmap(&got, max);
        for x in 0..max {
            prop_assert_eq!(bits[x as usize], model_marked(&tick, &tock, tick_len, tock_len, x),
                "byte {} of tick {:?} tock {:?} lens {} {} -> {:?}", x, tick, tock, tick_len, tock_len, got);
        }
        // Symmetric.
        prop_assert_eq!(got, changed_ranges(&tock, &tick, tock_len, tick_len));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// 4 KiB-block scale, as filesystems report: extents block-aligned, file
    /// lengths not. Inside a block below both lengths, every byte has the
    /// same state, so the model is evaluated once per block; the result
    /// must be exactly those blocks (cut at the shorter length) plus the
    /// size change.
    #[test]
    fn matches_the_block_model_exactly((tick, tock, tick_len, tock_len) in case(4096)) {
        let got = changed_ranges(&tick, &tock, tick_len, tock_len);
        let (min, max) = (tick_len.min(tock_len), tick_len.max(tock_len));
        let mut want: Vec<(u64, u64)> = Vec::new();
        let mut add = |start: u64, end: u64| {
            if start >= end {
                return;
            }
            match want.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 += end - start,
                _ => want.push((start, end - start)),
            }
        };
        for block in 0..min.div_ceil(4096) {
            let start = block * 4096;
            if model_marked(&tick, &tock, tick_len, tock_len, start) {
                add(start, (start + 4096).min(min));
            }
        }
        add(min, max);
        prop_assert_eq!(got, want);
    }
}
