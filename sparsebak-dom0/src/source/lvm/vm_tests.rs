//! Tests against real lvm2, device-mapper and thin_delta. They change LVM
//! state, so they are `#[ignore]`d in a plain `cargo test` (which lists
//! them as ignored, with the reason) and run explicitly (`--ignored`) by
//! `tests/lvm/commands-test.sh` inside a throwaway VM (`tests/vm/run-in-vm`),
//! with `SPARSEBAK_LVM_TEST_VG` naming a scratch volume group. Run without
//! it, the test fails instead of passing without testing.
//!
//! Expected by the script: VG `$SPARSEBAK_LVM_TEST_VG` with two empty thin
//! pools, `$SPARSEBAK_LVM_TEST_POOL` (64 KiB blocks: smaller than an archive
//! chunk) and `$SPARSEBAK_LVM_TEST_POOL_BIG` (1 MiB blocks: larger). Names
//! with hyphens exercise device-mapper name escaping.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Instant;

use anyhow::bail;

use super::commands::ThinPool;
use super::thin_delta::{ChangeKind, ChangedRange};
use crate::changes::DeltaMap;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const CHUNK: u64 = 128 * KIB;

fn sh(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(out.status.success(), "{prog} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes `len` random bytes at `offset` with dd, bypassing the page cache
/// so that the data is in the thin device before the next snapshot.
fn write_at(p: &ThinPool, lv: &str, offset: u64, len: u64) {
    assert_eq!((offset | len) & 4095, 0, "dd writes whole 4 KiB blocks");
    let dev = p.dev_path(lv).expect("dev path");
    sh(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", dev.display()),
            "bs=4096",
            &format!("seek={}", offset / 4096),
            &format!("count={}", len / 4096),
            "oflag=direct",
            "conv=notrunc,fsync",
            "status=none",
        ],
    );
}

/// tock takes tick's place, as `TrackedVolume` rotates them.
fn rotate(p: &ThinPool, tock: &str, tick: &str) {
    if p.lv(tick).expect("lvs").is_some() {
        p.remove_lv(tick).expect("remove tick");
    }
    p.rename_lv(tock, tick).expect("rotate");
}

fn discard(p: &ThinPool, lv: &str, offset: u64, len: u64) {
    let dev = p.dev_path(lv).expect("dev path");
    sh("blkdiscard", &["-o", &offset.to_string(), "-l", &len.to_string(), &dev.display().to_string()]);
}

/// Scans and returns (per-block kinds, chunks marked in a fresh delta map).
fn scan(p: &ThinPool, left: &str, right: &str) -> (BTreeMap<u64, ChangeKind>, Vec<u64>, u64) {
    let t = Instant::now();
    let mut ranges: Vec<ChangedRange> = Vec::new();
    let res = p
        .scan_changes(left, right, |r| {
            ranges.push(r);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("scan {left} {right}: {e:#}"));
    eprintln!(
        "scan {left} -> {right}: {} ranges, {} bytes, block size {}, {:?}",
        ranges.len(),
        res.summary.changed_bytes,
        res.summary.block_size,
        t.elapsed()
    );
    let bs = res.summary.block_size;
    let mut blocks = BTreeMap::new();
    let mut map = DeltaMap::for_volume(CHUNK, res.right.size).expect("map");
    for r in &ranges {
        map.mark_bytes(r.start, r.len).expect("mark");
        for b in r.start / bs..(r.start + r.len) / bs {
            assert!(blocks.insert(b, r.kind).is_none(), "block {b} twice");
        }
    }
    assert_eq!(map.len(), res.right.size / CHUNK, "map grew past the volume");
    assert_eq!(p.held_metadata_root().expect("status"), None, "metadata snapshot left reserved");
    (blocks, map.iter_marked().collect(), bs)
}

fn kinds(list: &[(std::ops::RangeInclusive<u64>, ChangeKind)]) -> BTreeMap<u64, ChangeKind> {
    list.iter().flat_map(|(r, k)| r.clone().map(move |b| (b, *k))).collect()
}

#[test]
#[ignore = "changes LVM state: run by tests/lvm/commands-test.sh inside a throwaway VM"]
fn thin_pool_in_vm() {
    let vg = std::env::var("SPARSEBAK_LVM_TEST_VG").expect("SPARSEBAK_LVM_TEST_VG (see tests/lvm/commands-test.sh)");
    let pool_name = std::env::var("SPARSEBAK_LVM_TEST_POOL").expect("SPARSEBAK_LVM_TEST_POOL");
    let big_name = std::env::var("SPARSEBAK_LVM_TEST_POOL_BIG").expect("SPARSEBAK_LVM_TEST_POOL_BIG");
    let p = ThinPool::new(&vg, &pool_name).expect("pool");
    p.check().expect("check");
    let (vol, tick, tock) = ("vm-test-private", "vm-test-private.tick", "vm-test-private.tock");
    sh("lvm", &["lvcreate", "-q", "-V", "64M", "-T", &format!("{vg}/{pool_name}"), "-n", vol]);

    // State at the last send: 0..1 MiB and 8 MiB..+256 KiB written.
    write_at(&p, vol, 0, MIB);
    write_at(&p, vol, 8 * MIB, 256 * KIB);
    p.create_snapshot(vol, tick).expect("tick");

    // Changes: a rewrite inside old data (CoW), fresh writes (one spanning
    // several blocks, one at the very end) and a discard of old data.
    write_at(&p, vol, MIB - 4 * KIB, 4 * KIB); // block 15, chunk 7
    write_at(&p, vol, 20 * MIB + 68 * KIB, 4 * KIB); // block 321, chunk 160
    write_at(&p, vol, 30 * MIB + 64 * KIB, 300 * KIB); // blocks 481-485, chunks 240-242
    write_at(&p, vol, 64 * MIB - 4 * KIB, 4 * KIB); // block 1023, chunk 511
    discard(&p, vol, 8 * MIB, 256 * KIB); // blocks 128-131, chunks 64-65
    p.create_snapshot(vol, tock).expect("tock");
    let tock_info = p.lv(tock).expect("lvs").expect("tock exists");
    assert!(tock_info.is_active() && tock_info.attr.starts_with("Vr"), "{tock_info:?}");

    let (blocks, chunks, bs) = scan(&p, tick, tock);
    assert_eq!(bs, 64 * KIB);
    assert_eq!(
        blocks,
        kinds(&[
            (15..=15, ChangeKind::Different),
            (128..=131, ChangeKind::LeftOnly),
            (321..=321, ChangeKind::RightOnly),
            (481..=485, ChangeKind::RightOnly),
            (1023..=1023, ChangeKind::RightOnly),
        ])
    );
    assert_eq!(chunks, vec![7, 64, 65, 160, 240, 241, 242, 511]);

    // The mapping of tock (what a first send reads): the discarded blocks
    // are gone, every written one is there.
    let mut mapped = Vec::new();
    let mapping = p
        .mapped_ranges(tock, |start, len| {
            assert_eq!((start % (64 * KIB), len % (64 * KIB)), (0, 0));
            mapped.extend(start / (64 * KIB)..(start + len) / (64 * KIB));
            Ok(())
        })
        .expect("mapped ranges");
    assert_eq!(mapped, (0..16).chain([321]).chain(481..486).chain([1023]).collect::<Vec<u64>>());
    assert_eq!(mapping.mapped_bytes, mapped.len() as u64 * 64 * KIB);
    assert_eq!(mapping.volume_size, 64 * MIB);
    assert_eq!(p.held_metadata_root().expect("status"), None, "metadata snapshot released");

    // Rotation: tock becomes tick.
    let tock_id = tock_info.thin_id;
    rotate(&p, tock, tick);
    assert!(p.lv(tock).expect("lvs").is_none());
    assert_eq!(p.lv(tick).expect("lvs").expect("tick").thin_id, tock_id);

    // A metadata snapshot left reserved by a killed run is released.
    sh("dmsetup", &["message", &p.tpool_dm_name(), "0", "reserve_metadata_snap"]);
    assert!(p.held_metadata_root().expect("status").is_some());
    write_at(&p, vol, 40 * MIB, 64 * KIB); // block 640, chunk 320
    p.create_snapshot(vol, tock).expect("tock 2");
    let (blocks, chunks, _) = scan(&p, tick, tock);
    assert_eq!(blocks, kinds(&[(640..=640, ChangeKind::RightOnly)]));
    assert_eq!(chunks, vec![320]);

    // Failures release the metadata snapshot and name the object.
    let e = p.scan_changes(tick, tock, |_| bail!("callback refuses")).expect_err("callback error");
    assert!(format!("{e:#}").contains("callback refuses"), "{e:#}");
    assert_eq!(p.held_metadata_root().expect("status"), None);
    let e = ThinPool::new(&vg, &pool_name)
        .expect("names")
        .scan_changes(tick, "no-such-lv", |_| Ok(()))
        .expect_err("missing");
    assert!(format!("{e:#}").contains("no-such-lv"), "{e:#}");
    let e = p.scan_changes(tick, &big_name, |_| Ok(())).expect_err("pool");
    assert!(format!("{e:#}").contains("not a thin volume"), "{e:#}");
    let e = ThinPool::new(&vg, "no-pool").expect("name").check().expect_err("no pool");
    assert!(format!("{e:#}").contains("not found"), "{e:#}");
    assert_eq!(p.held_metadata_root().expect("status"), None);
    p.remove_lv(tock).expect("remove tock");

    // Pool blocks larger than a chunk: one changed 1 MiB block marks 8 chunks.
    let b = ThinPool::new(&vg, &big_name).expect("pool");
    let (bvol, btick, btock) = ("big-vol", "big-vol.tick", "big-vol.tock");
    sh("lvm", &["lvcreate", "-q", "-V", "32M", "-T", &format!("{vg}/{big_name}"), "-n", bvol]);
    write_at(&b, bvol, 0, 2 * MIB);
    b.create_snapshot(bvol, btick).expect("tick");
    write_at(&b, bvol, 4 * KIB, 4 * KIB); // block 0 rewritten
    write_at(&b, bvol, 5 * MIB + 8 * KIB, 4 * KIB); // block 5 new
    b.create_snapshot(bvol, btock).expect("tock");
    let (blocks, chunks, bs) = scan(&b, btick, btock);
    assert_eq!(bs, MIB);
    assert_eq!(blocks, kinds(&[(0..=0, ChangeKind::Different), (5..=5, ChangeKind::RightOnly)]));
    assert_eq!(chunks, (0..8).chain(40..48).collect::<Vec<_>>());
    rotate(&b, btock, btick);

    // Shrink: tick has block 20, the shrunk tock ends at 16 MiB. A change
    // of block 20 must be clipped away by scan_changes (the helper checks
    // that the map does not grow past the volume).
    write_at(&b, bvol, 20 * MIB, 4 * KIB);
    b.create_snapshot(bvol, btock).expect("tock");
    let (blocks, _, _) = scan(&b, btick, btock);
    assert_eq!(blocks, kinds(&[(20..=20, ChangeKind::RightOnly)]));
    rotate(&b, btock, btick);
    // lvreduce keeps the mappings past the new end, so rewrite block 20
    // first: thin_delta then reports it as different, past the end of tock.
    write_at(&b, bvol, 20 * MIB, 4 * KIB);
    sh("lvm", &["lvreduce", "-q", "-f", "-L", "16M", &format!("{vg}/{bvol}")]);
    write_at(&b, bvol, MIB + 4 * KIB, 4 * KIB); // block 1 rewritten
    b.create_snapshot(bvol, btock).expect("tock");
    let (blocks, chunks, _) = scan(&b, btick, btock);
    assert_eq!(blocks, kinds(&[(1..=1, ChangeKind::Different)]));
    assert_eq!(chunks, (8..16).collect::<Vec<_>>());
    rotate(&b, btock, btick);

    // Growth: the new tail shows up as right_only where it was written.
    sh("lvm", &["lvextend", "-q", "-L", "48M", &format!("{vg}/{bvol}")]);
    write_at(&b, bvol, 40 * MIB, 4 * KIB);
    b.create_snapshot(bvol, btock).expect("tock");
    let (blocks, chunks, _) = scan(&b, btick, btock);
    assert_eq!(blocks, kinds(&[(40..=40, ChangeKind::RightOnly)]));
    assert_eq!(chunks, (320..328).collect::<Vec<_>>());
    rotate(&b, btock, btick);

    // Nothing left behind.
    let lvs = sh("lvm", &["lvs", "--noheadings", "-o", "lv_name", &vg]);
    assert!(!lvs.contains(".tock"), "{lvs}");
    assert_eq!(p.held_metadata_root().expect("status"), None);
    assert_eq!(b.held_metadata_root().expect("status"), None);
    eprintln!("thin_pool_in_vm: all checks passed");
}
