//! Tests on hand-written XML in the formats of 0.9 and 1.x, and on real
//! `thin_delta` output for metadata that `thin_restore` builds from XML.

use super::*;
use crate::source::lvm::test_tools::{metadata_xml, restore_metadata, tool, Mapping};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

fn parse_all(xml: &str) -> Result<(DeltaSummary, Vec<ChangedRange>)> {
    let mut v = Vec::new();
    let s = parse_thin_delta(xml.as_bytes(), |r| {
        v.push(r);
        Ok(())
    })?;
    Ok((s, v))
}

fn r(start: u64, len: u64, kind: ChangeKind) -> ChangedRange {
    ChangedRange { start, len, kind }
}

const K: u64 = 64 * 1024;

/// Verbatim output of thin_delta 0.9.0 (`thin_delta --snap1 1 --snap2 2`).
const V09: &str = r#"<superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="100">
  <diff left="1" right="2">
    <same begin="0" length="2"/>
    <different begin="2" length="2"/>
    <same begin="10" length="1"/>
    <left_only begin="20" length="1"/>
    <right_only begin="30" length="1"/>
  </diff>
</superblock>
"#;

#[test]
fn format_0_9() {
    let (s, v) = parse_all(V09).expect("parse");
    assert_eq!(s.block_size, K);
    assert_eq!((s.left, s.right), (Some(1), Some(2)));
    assert_eq!(
        v,
        vec![
            r(2 * K, 2 * K, ChangeKind::Different),
            r(20 * K, K, ChangeKind::LeftOnly),
            r(30 * K, K, ChangeKind::RightOnly),
        ]
    );
    assert_eq!(s.changed_ranges, 3);
    assert_eq!(s.changed_bytes, 4 * K);
    assert_eq!(s.same_bytes, 3 * K);
}

/// The 1.x writer: `version` and `flags` on the superblock, quick-xml's
/// two-space indent, possibly an XML declaration in front.
#[test]
fn format_1_x() {
    let xml = r#"<?xml version="1.0"?>
<superblock uuid="" time="3" transaction="7" flags="1" version="2" data_block_size="2048" nr_data_blocks="4096">
  <diff left="5" right="9">
    <right_only begin="0" length="3"/>
    <same begin="3" length="10"/>
    <different begin="13" length="1"/>
  </diff>
</superblock>"#;
    let (s, v) = parse_all(xml).expect("parse");
    let m = 1024 * 1024;
    assert_eq!(s.block_size, m);
    assert_eq!((s.left, s.right), (Some(5), Some(9)));
    assert_eq!(v, vec![r(0, 3 * m, ChangeKind::RightOnly), r(13 * m, m, ChangeKind::Different)]);
}

#[test]
fn format_1_x_roots_and_verbose() {
    let xml = r#"<superblock uuid="" time="1" transaction="2" version="2" data_block_size="128" nr_data_blocks="100">
  <diff left_root="17" right_root="23">
    <same>
      <range begin="0" data_begin="0" length="2"/>
    </same>
    <different>
      <range begin="2" left_data_begin="2" right_data_begin="50" length="2"/>
      <range begin="8" left_data_begin="8" right_data_begin="60" length="1"/>
    </different>
    <left_only>
      <range begin="20" data_begin="20" length="1"/>
    </left_only>
    <right_only>
      <range begin="30" data_begin="30" length="1"/>
    </right_only>
  </diff>
</superblock>"#;
    let (s, v) = parse_all(xml).expect("parse");
    assert_eq!((s.left, s.right), (None, None));
    assert_eq!(
        v,
        vec![
            r(2 * K, 2 * K, ChangeKind::Different),
            r(8 * K, K, ChangeKind::Different),
            r(20 * K, K, ChangeKind::LeftOnly),
            r(30 * K, K, ChangeKind::RightOnly),
        ]
    );
}

#[test]
fn identical_devices() {
    for xml in [
        r#"<superblock data_block_size="128"><diff left="1" right="2"></diff></superblock>"#,
        r#"<superblock data_block_size="128"><diff left="1" right="2"/></superblock>"#,
        r#"<superblock data_block_size="128"><diff left="1" right="2"><same begin="0" length="9"/></diff></superblock>"#,
    ] {
        let (s, v) = parse_all(xml).expect(xml);
        assert!(v.is_empty());
        assert_eq!(s.changed_bytes, 0);
    }
}

fn err_of(xml: &str) -> String {
    match parse_all(xml) {
        Ok(x) => panic!("accepted {xml:?}: {x:?}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn malformed() {
    let cases: &[(&str, &str)] = &[
        ("", "empty"),
        ("   \n", "empty"),
        (r#"<superblock uuid="">"#, "data_block_size"),
        (r#"<superblock data_block_size="0"></superblock>"#, "data_block_size is 0"),
        (r#"<superblock data_block_size="x1"></superblock>"#, "not a non-negative integer"),
        (r#"<superblock data_block_size="-128"></superblock>"#, "not a non-negative integer"),
        (
            r#"<superblock data_block_size="128"><diff left="1" right="2"><different begin="3" length="1"/>"#,
            "truncated",
        ),
        (r#"<superblock data_block_size="128"><diff left="1" right="2"><different begin="3" len"#, "malformed"),
        (r#"<superblock data_block_size="128"><diff><different begin="3"/></diff></superblock>"#, "length"),
        (r#"<superblock data_block_size="128"><different begin="3" length="1"/></superblock>"#, "unexpected element"),
        (r#"<superblock data_block_size="128"><diff></superblock></diff>"#, "superblock"),
        (
            r#"<superblock data_block_size="128"><diff><different begin="18446744073709551615" length="1"/></diff></superblock>"#,
            "overflows",
        ),
        (
            r#"<superblock data_block_size="128"><diff><different begin="1" length="281474976710656"/></diff></superblock>"#,
            "overflows",
        ),
        (r#"<superblock data_block_size="36028797018963968"></superblock>"#, "overflows"),
        (r#"<superblock data_block_size="128">oops<diff/></superblock>"#, "unexpected text"),
        (
            r#"<superblock data_block_size="128"></superblock><superblock data_block_size="128"></superblock>"#,
            "unexpected element",
        ),
        (r#"<foo/>"#, "unexpected element"),
    ];
    for (xml, want) in cases {
        let e = err_of(xml);
        assert!(e.contains(want), "{xml:?}: error {e:?} lacks {want:?}");
    }
}

#[test]
fn callback_error_stops_parsing() {
    let mut n = 0;
    let e = parse_thin_delta(V09.as_bytes(), |_| {
        n += 1;
        bail!("disk full")
    })
    .expect_err("must fail");
    assert_eq!(n, 1);
    assert!(format!("{e:#}").contains("disk full"));
}

/// Feeds a long document through a reader that hands out a few bytes at a
/// time, as a pipe does: events that span reads must come out intact.
#[test]
fn streams_in_small_pieces() {
    struct Trickle<'a>(&'a [u8]);
    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(b.len()).min(7);
            b[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let mut xml = String::from(r#"<superblock data_block_size="128"><diff left="1" right="2">"#);
    for i in 0..10_000u64 {
        let _ = writeln!(xml, "<different begin=\"{}\" length=\"1\"/>", i * 2);
    }
    xml.push_str("</diff></superblock>");
    let mut count = 0u64;
    let s = parse_thin_delta(std::io::BufReader::with_capacity(16, Trickle(xml.as_bytes())), |c| {
        assert_eq!(c.start, count * 2 * K);
        count += 1;
        Ok(())
    })
    .expect("parse");
    assert_eq!(count, 10_000);
    assert_eq!(s.changed_bytes, 10_000 * K);
}

// ---- real thin_delta -------------------------------------------------------

/// Builds metadata with thin_restore and returns thin_delta's stdout.
fn real_delta(dir: &Path, xml: &str, left: u32, right: u32) -> String {
    let meta = restore_metadata(dir, xml);
    let out = Command::new(tool("thin_delta"))
        .args(["--snap1", &left.to_string(), "--snap2", &right.to_string()])
        .arg(&meta)
        .output()
        .expect("run thin_delta");
    assert!(out.status.success(), "thin_delta: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The expected change per thin block, from the two mappings.
fn model(left: &Mapping, right: &Mapping) -> BTreeMap<u64, ChangeKind> {
    let mut m = BTreeMap::new();
    for (t, d) in left {
        match right.get(t) {
            Some(d2) if d2 == d => {}
            Some(_) => {
                m.insert(*t, ChangeKind::Different);
            }
            None => {
                m.insert(*t, ChangeKind::LeftOnly);
            }
        }
    }
    for t in right.keys() {
        if !left.contains_key(t) {
            m.insert(*t, ChangeKind::RightOnly);
        }
    }
    m
}

/// Expands parsed byte ranges back to per-block kinds, checking that ranges
/// are block-aligned and never overlap.
fn blocks_of(ranges: &[ChangedRange], bs: u64) -> BTreeMap<u64, ChangeKind> {
    let mut m = BTreeMap::new();
    for c in ranges {
        assert_eq!(c.start % bs, 0);
        assert_eq!(c.len % bs, 0);
        assert!(c.len > 0);
        for b in c.start / bs..(c.start + c.len) / bs {
            assert!(m.insert(b, c.kind).is_none(), "block {b} reported twice");
        }
    }
    m
}

#[test]
fn real_thin_delta_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    // tick (1): blocks 0-3, 10, 20.  tock (2): shares 0-1 and 10 with tick,
    // rewrote 2-3 (new data blocks), dropped 20, gained 30 and 31.
    let left: Mapping = [(0, 0), (1, 1), (2, 2), (3, 3), (10, 10), (20, 20)].into();
    let right: Mapping = [(0, 0), (1, 1), (2, 50), (3, 51), (10, 10), (30, 30), (31, 31)].into();
    let out = real_delta(dir.path(), &metadata_xml(128, 100, &[&left, &right]), 1, 2);
    let (s, v) = parse_all(&out).unwrap_or_else(|e| panic!("{e:#}\n{out}"));
    assert_eq!(s.block_size, K);
    assert_eq!((s.left, s.right), (Some(1), Some(2)));
    assert_eq!(
        v,
        vec![
            r(2 * K, 2 * K, ChangeKind::Different),
            r(20 * K, K, ChangeKind::LeftOnly),
            r(30 * K, 2 * K, ChangeKind::RightOnly),
        ],
        "{out}"
    );
    assert_eq!(s.same_bytes, 3 * K);
    // The other direction swaps left_only and right_only.
    let out = real_delta(dir.path(), &metadata_xml(128, 100, &[&left, &right]), 2, 1);
    let (s, v) = parse_all(&out).unwrap_or_else(|e| panic!("{e:#}\n{out}"));
    assert_eq!((s.left, s.right), (Some(2), Some(1)));
    assert_eq!(
        v,
        vec![
            r(2 * K, 2 * K, ChangeKind::Different),
            r(20 * K, K, ChangeKind::RightOnly),
            r(30 * K, 2 * K, ChangeKind::LeftOnly),
        ],
        "{out}"
    );
}

/// Identical devices and an empty device against a full one.
#[test]
fn real_thin_delta_edges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let full: Mapping = (0..40).map(|b| (b, b)).collect();
    let empty = Mapping::new();
    let xml = metadata_xml(2048, 100, &[&full, &full.clone(), &empty]);
    let out = real_delta(dir.path(), &xml, 1, 2);
    let (s, v) = parse_all(&out).unwrap_or_else(|e| panic!("{e:#}\n{out}"));
    assert!(v.is_empty(), "{out}");
    assert_eq!(s.same_bytes, 40 << 20);
    let out = real_delta(dir.path(), &xml, 3, 1);
    let (s, v) = parse_all(&out).unwrap_or_else(|e| panic!("{e:#}\n{out}"));
    assert_eq!(v, vec![r(0, 40 << 20, ChangeKind::RightOnly)], "{out}");
    assert_eq!(s.block_size, 1 << 20);
}

/// Random pairs of devices (a snapshot and its origin after random writes,
/// discards and fresh allocations), checked block by block against a model.
#[test]
fn real_thin_delta_random() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..12 {
        let n = 50 + rnd(400);
        let mut left = Mapping::new();
        for b in 0..n {
            if rnd(3) > 0 {
                left.insert(b, b);
            }
        }
        let mut right = left.clone();
        let mut next_data = n;
        for b in 0..n {
            match rnd(10) {
                0 | 1 => {
                    // write: a new data block (new allocation or CoW).
                    right.insert(b, next_data);
                    next_data += 1;
                }
                2 => {
                    right.remove(&b);
                }
                _ => {}
            }
        }
        let sectors = [128u64, 256, 1024, 2048][round % 4];
        let xml = metadata_xml(sectors, next_data + 10, &[&left, &right]);
        let out = real_delta(dir.path(), &xml, 1, 2);
        let (s, v) = parse_all(&out).unwrap_or_else(|e| panic!("{e:#}\n{out}"));
        assert_eq!(s.block_size, sectors * 512);
        assert_eq!(blocks_of(&v, s.block_size), model(&left, &right), "round {round}");
    }
}
