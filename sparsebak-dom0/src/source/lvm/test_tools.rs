//! Test tools shared by the parsers' tests: real thin-provisioning-tools
//! run on metadata that `thin_restore` builds from XML (no kernel needed).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Finds a thin-provisioning-tools binary (root's PATH has /usr/sbin, a
/// developer's may not).
pub fn tool(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/sbin", "/sbin"]) {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found: install thin-provisioning-tools to run these tests");
}

/// A thin device: thin block -> data block.
pub type Mapping = BTreeMap<u64, u64>;

/// Writes thin_restore's input XML for the given devices (ids 1, 2, ...).
pub fn metadata_xml(block_sectors: u64, nr_data_blocks: u64, devs: &[&Mapping]) -> String {
    let mut x = format!(
        "<superblock uuid=\"\" time=\"1\" transaction=\"{}\" data_block_size=\"{block_sectors}\" nr_data_blocks=\"{nr_data_blocks}\">\n",
        devs.len()
    );
    for (i, m) in devs.iter().enumerate() {
        let _ = writeln!(
            x,
            "  <device dev_id=\"{}\" mapped_blocks=\"{}\" transaction=\"{i}\" creation_time=\"0\" snap_time=\"1\">",
            i + 1,
            m.len()
        );
        for (t, d) in m.iter() {
            let _ = writeln!(x, "    <single_mapping origin_block=\"{t}\" data_block=\"{d}\" time=\"0\"/>");
        }
        x.push_str("  </device>\n");
    }
    x.push_str("</superblock>\n");
    x
}

/// Builds pool metadata from thin_restore's input XML; returns its path.
pub fn restore_metadata(dir: &Path, xml: &str) -> PathBuf {
    let x = dir.join("meta.xml");
    let meta = dir.join("meta.bin");
    std::fs::write(&x, xml).expect("write xml");
    // thin_restore wants an existing output file large enough for the metadata.
    let f = std::fs::File::create(&meta).expect("create meta");
    f.set_len(8 << 20).expect("size meta");
    drop(f);
    let out =
        Command::new(tool("thin_restore")).arg("-i").arg(&x).arg("-o").arg(&meta).output().expect("run thin_restore");
    assert!(out.status.success(), "thin_restore: {}", String::from_utf8_lossy(&out.stderr));
    meta
}
