//! Tests on hand-written XML and on real `thin_dump` output for metadata
//! that `thin_restore` builds from XML.

use super::*;
use crate::source::lvm::test_tools::{metadata_xml, restore_metadata, tool, Mapping};
use std::process::Command;

const K: u64 = 64 * 1024;

fn parse_all(xml: &str, dev: u64) -> Result<(MappingSummary, Vec<(u64, u64)>)> {
    let mut v = Vec::new();
    let s = parse_thin_dump(xml.as_bytes(), dev, |start, len| {
        v.push((start, len));
        Ok(())
    })?;
    Ok((s, v))
}

/// Verbatim output of thin_dump 0.9.0 (`thin_dump --dev-id 1`).
const V09: &str = r#"<superblock uuid="" time="1" transaction="2" flags="0" version="1" data_block_size="128" nr_data_blocks="100">
  <device dev_id="1" mapped_blocks="4" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="5" length="3" time="0"/>
    <single_mapping origin_block="9" data_block="20" time="0"/>
  </device>
</superblock>
"#;

#[test]
fn format_0_9() {
    let (s, v) = parse_all(V09, 1).expect("parse");
    assert_eq!(s, MappingSummary { block_size: K, mapped_blocks: 4 });
    assert_eq!(v, vec![(0, 3 * K), (9 * K, K)]);
}

fn err_of(xml: &str, dev: u64) -> String {
    format!("{:#}", parse_all(xml, dev).expect_err("must fail"))
}

/// Every way the mapping could be incomplete is an error, never "nothing
/// mapped there" (which would skip data).
#[test]
fn incomplete_or_unknown_output_is_refused() {
    assert!(err_of(V09, 2).contains("device 1, not 2"));
    let no_device =
        V09.lines().filter(|l| !l.contains("mapping") && !l.contains("device")).collect::<Vec<_>>().join("\n");
    assert!(err_of(&no_device, 1).contains("no device 1"), "{}", err_of(&no_device, 1));
    let short = V09.replace("mapped_blocks=\"4\"", "mapped_blocks=\"5\"");
    assert!(err_of(&short, 1).contains("5 mapped blocks but lists 4"));
    let cut = &V09[..V09.find("<single_mapping").expect("has one")];
    assert!(err_of(cut, 1).contains("truncated") || err_of(cut, 1).contains("malformed"), "{}", err_of(cut, 1));
    let shared = V09.replace("<single_mapping origin_block=\"9\" data_block=\"20\" time=\"0\"/>", "<ref name=\"3\"/>");
    assert!(err_of(&shared, 1).contains("shared mapping subtrees"));
    let twice = V09.replace("</device>\n", "</device>\n  <device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"1\"/>\n");
    assert!(err_of(&twice, 1).contains("twice"));
    let huge = V09.replace("origin_block=\"9\"", "origin_block=\"18446744073709551615\"");
    assert!(err_of(&huge, 1).contains("overflows"));
    assert!(err_of("", 1).contains("truncated"));
}

/// Real thin_dump output of devices with known mappings, mixed runs and
/// single blocks, for every device of the metadata.
#[test]
fn real_thin_dump_matches_the_mapping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = Mapping::new();
    for t in (0..40).chain(100..101).chain(300..364) {
        a.insert(t, t + 7);
    }
    let mut b = Mapping::new();
    for t in [3u64, 5, 6, 7, 1000] {
        b.insert(t, 2000 + t);
    }
    let empty = Mapping::new();
    let meta = restore_metadata(dir.path(), &metadata_xml(128, 4096, &[&a, &b, &empty]));
    for (id, want) in [(1u64, &a), (2, &b), (3, &empty)] {
        let out = Command::new(tool("thin_dump"))
            .args(["--dev-id", &id.to_string()])
            .arg(&meta)
            .output()
            .expect("run thin_dump");
        assert!(out.status.success(), "thin_dump: {}", String::from_utf8_lossy(&out.stderr));
        let mut blocks = Vec::new();
        let sum = parse_thin_dump(&out.stdout[..], id, |start, len| {
            assert_eq!((start % K, len % K), (0, 0));
            blocks.extend(start / K..(start + len) / K);
            Ok(())
        })
        .expect("parses");
        assert_eq!(blocks, want.keys().copied().collect::<Vec<_>>(), "device {id}");
        assert_eq!(sum.mapped_blocks, want.len() as u64);
    }
}
