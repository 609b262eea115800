use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

const C: u64 = 128 * 1024;

fn marked(m: &DeltaMap) -> Vec<u64> {
    m.iter_marked().collect()
}

#[test]
fn block_smaller_than_chunk() {
    // 64 KiB pool blocks, 128 KiB chunks: each block lies in one chunk.
    let mut m = DeltaMap::new(C, 10).expect("new");
    m.mark_bytes(64 * 1024, 64 * 1024).expect("mark"); // second half of chunk 0
    m.mark_bytes(3 * C, 64 * 1024).expect("mark"); // first half of chunk 3
    m.mark_bytes(5 * C + 64 * 1024, 128 * 1024).expect("mark"); // straddles 5 and 6
    assert_eq!(marked(&m), vec![0, 3, 5, 6]);
    assert_eq!(m.len(), 10);
}

#[test]
fn block_equal_to_chunk() {
    let mut m = DeltaMap::new(C, 10).expect("new");
    m.mark_bytes(2 * C, C).expect("mark");
    m.mark_bytes(7 * C, 2 * C).expect("mark");
    assert_eq!(marked(&m), vec![2, 7, 8]);
}

#[test]
fn block_larger_than_chunk() {
    // 1 MiB pool blocks: 8 chunks each.
    let mut m = DeltaMap::new(C, 64).expect("new");
    m.mark_bytes(1 << 20, 1 << 20).expect("mark");
    assert_eq!(marked(&m), (8..16).collect::<Vec<_>>());
    assert_eq!(m.count_marked(), 8);
}

#[test]
fn grows_past_end() {
    let mut m = DeltaMap::new(C, 3).expect("new");
    m.mark_bytes(10 * C + 1, 1).expect("mark");
    assert_eq!(m.len(), 11);
    assert_eq!(marked(&m), vec![10]);
    m.mark(20).expect("mark");
    assert_eq!(m.len(), 21);
    assert!(m.is_marked(20) && !m.is_marked(19) && !m.is_marked(21));
}

#[test]
fn limits() {
    assert!(DeltaMap::new(0, 1).is_err());
    assert!(DeltaMap::new(C, MAX_CHUNKS + 1).is_err());
    let mut m = DeltaMap::new(512, 0).expect("new");
    let e = m.mark_bytes(u64::MAX - 10, 10).expect_err("too big");
    assert!(format!("{e:#}").contains("exceeds"), "{e:#}");
    assert_eq!(m.len(), 0);
    // No overflow at the very end of the u64 range with huge chunks.
    let mut m = DeltaMap::new(1 << 62, 0).expect("new");
    m.mark_bytes(u64::MAX, u64::MAX).expect("mark");
    assert_eq!(marked(&m), vec![3, 4, 5, 6, 7]);
}

#[test]
fn resize_clear_mark_all() {
    let mut m = DeltaMap::new(C, 20).expect("new");
    m.mark_all();
    assert_eq!(m.count_marked(), 20);
    m.resize(13).expect("shrink");
    assert_eq!(m.count_marked(), 13);
    m.resize(30).expect("grow");
    assert_eq!(marked(&m), (0..13).collect::<Vec<_>>());
    m.clear();
    assert_eq!(m.count_marked(), 0);
    assert_eq!(m.len(), 30);
    let m = DeltaMap::for_volume(C, 10 * C + 1).expect("new");
    assert_eq!(m.len(), 11);
}

#[test]
fn save_load_roundtrip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("vol.deltamap");
    match DeltaMap::load(&p) {
        Err(LoadError::Missing(_)) => {}
        other => panic!("{other:?}"),
    }
    let mut m = DeltaMap::new(C, 1001).expect("new");
    for i in [0, 7, 8, 500, 1000] {
        m.mark(i).expect("mark");
    }
    m.save(&p).expect("save");
    assert_eq!(DeltaMap::load(&p).expect("load"), m);
    assert!(!dir.path().join("vol.deltamap.new").exists());
    // Saving again replaces it.
    m.clear();
    m.save(&p).expect("save");
    assert_eq!(DeltaMap::load(&p).expect("load").count_marked(), 0);
}

#[test]
fn damage_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("vol.deltamap");
    let mut m = DeltaMap::new(C, 77).expect("new");
    m.mark(5).expect("mark");
    let good = m.to_bytes();
    // Every truncation (a half-written file) and every single-bit flip.
    for n in 0..good.len() {
        std::fs::write(&p, &good[..n]).expect("write");
        match DeltaMap::load(&p) {
            Err(LoadError::Corrupt(..)) => {}
            other => panic!("truncated to {n}: {other:?}"),
        }
    }
    for i in 0..good.len() * 8 {
        let mut bad = good.clone();
        bad[i / 8] ^= 1 << (i % 8);
        assert!(DeltaMap::from_bytes(&bad).is_err(), "bit {i} flipped");
    }
    // Bits past the end with a matching checksum (a writer bug) are refused.
    let mut body = good[..good.len() - 32].to_vec();
    *body.last_mut().expect("byte") |= 0x80;
    let sum = Sha256::digest(&body);
    body.extend_from_slice(&sum);
    let e = DeltaMap::from_bytes(&body).expect_err("padding");
    assert!(e.contains("past the last"), "{e}");
    // A stale temporary file from a crashed save does not matter.
    std::fs::write(dir.path().join("vol.deltamap.new"), b"junk").expect("write");
    m.save(&p).expect("save");
    assert_eq!(DeltaMap::load(&p).expect("load"), m);
}

#[test]
fn format_version_one_loads_and_a_newer_map_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("vol.deltamap");
    let mut m = DeltaMap::new(C, 20).expect("new");
    m.mark(3).expect("mark");
    let bytes = m.to_bytes();
    // Version 1 is the "SBDMAP01" magic every map had before versions were named.
    assert_eq!(&bytes[..8], b"SBDMAP01");
    // An intact map (valid checksum) of version 2 comes from a newer sparsebak.
    let mut body = bytes[..bytes.len() - 32].to_vec();
    body[6..8].copy_from_slice(b"02");
    let sum = Sha256::digest(&body);
    body.extend_from_slice(&sum);
    std::fs::write(&p, &body).expect("write");
    let err = DeltaMap::load(&p).expect_err("newer refused");
    assert!(matches!(err, LoadError::Newer(_, 2)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&p.display().to_string()) && msg.contains("format version 2") && msg.contains("(version 1)"),
        "{msg}"
    );
    // Version digits that are no version are damage, even with a valid checksum.
    for digits in [b"00", b"+1", b" 1"] {
        let mut body = bytes[..bytes.len() - 32].to_vec();
        body[6..8].copy_from_slice(digits);
        let sum = Sha256::digest(&body);
        body.extend_from_slice(&sum);
        assert!(DeltaMap::from_bytes(&body).is_err(), "{digits:?}");
    }
    // A version digit flipped in a damaged map is damage, not a newer map.
    let mut flipped = bytes.clone();
    flipped[7] = b'7';
    std::fs::write(&p, &flipped).expect("write");
    assert!(matches!(DeltaMap::load(&p), Err(LoadError::Corrupt(..))));
}

proptest! {
    /// mark_bytes marks exactly the chunks that intersect the byte ranges,
    /// for chunk sizes smaller than, equal to and larger than the ranges'
    /// granularity, and the map survives a save/load round trip.
    #[test]
    fn mark_bytes_matches_model(
        chunk_pow in 9u32..22,
        ranges in proptest::collection::vec((0u64..1 << 26, 0u64..1 << 22), 0..40),
        initial in 0u64..300,
    ) {
        let cs = 1u64 << chunk_pow;
        let mut m = DeltaMap::new(cs, initial).expect("new");
        let mut want = BTreeSet::new();
        let mut end_chunks = initial;
        for (start, len) in &ranges {
            m.mark_bytes(*start, *len).expect("mark");
            if *len > 0 {
                let (a, b) = (start / cs, (start + len - 1) / cs);
                want.extend(a..=b);
                end_chunks = end_chunks.max(b + 1);
            }
        }
        prop_assert_eq!(m.len(), end_chunks);
        let got: BTreeSet<u64> = m.iter_marked().collect();
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(m.count_marked(), want.len() as u64);
        for i in 0..m.len().min(5000) {
            prop_assert_eq!(m.is_marked(i), want.contains(&i));
            prop_assert_eq!(m.next_marked(i), want.range(i..).next().copied());
        }
        let back = DeltaMap::from_bytes(&m.to_bytes()).expect("roundtrip");
        prop_assert_eq!(back, m);
    }
}
