//! Kernel-free tests of the parsing and naming; the commands themselves are
//! exercised in a VM by `tests/lvm/commands-test.sh` (see `vm_tests`).

use super::*;

#[test]
fn names() {
    for ok in ["qubes_dom0", "vm-work-private", "a+b.c_d", "vol.tick", "x"] {
        validate_lvm_name("lv", ok).expect(ok);
    }
    let long = "a".repeat(128);
    for bad in ["", "-x", ".", "..", "a b", "a/b", "a;b", "ä", long.as_str()] {
        assert!(validate_lvm_name("lv", bad).is_err(), "{bad:?}");
    }
    assert!(ThinPool::new("vg", "--help").is_err());
    let p = ThinPool::new("qubes_dom0", "pool00").expect("pool");
    assert!(p.dev_path("../etc").is_err());
}

#[test]
fn dm_names() {
    let p = ThinPool::new("my-vg", "pool-0").expect("pool");
    assert_eq!(p.tpool_dm_name(), "my--vg-pool--0-tpool");
    assert_eq!(p.tmeta_path(), PathBuf::from("/dev/mapper/my--vg-pool--0_tmeta"));
    let q = ThinPool::new("qubes_dom0", "pool00").expect("pool");
    assert_eq!(q.tpool_dm_name(), "qubes_dom0-pool00-tpool");
    assert_eq!(q.dev_path("vm-a-private").expect("path"), PathBuf::from("/dev/qubes_dom0/vm-a-private"));
}

#[test]
fn held_root() {
    let free = "0 4194304 thin-pool 3 11/1024 0/32768 - rw discard_passdown queue_if_no_space - 1024\n";
    assert_eq!(parse_held_root(free).expect("free"), None);
    let held = "0 4194304 thin-pool 3 13/1024 20/32768 117 rw discard_passdown queue_if_no_space - 1024";
    assert_eq!(parse_held_root(held).expect("held"), Some(117));
    for bad in [
        "0 4194304 thin-pool Fail",
        "0 4194304 thin-pool Error",
        "0 4194304 linear",
        "0 4194304 thin-pool 3 11/1024",
        "0 4194304 thin-pool 3 11/1024 0/32768 x12 rw",
        "",
    ] {
        assert!(parse_held_root(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn lvs_lines() {
    let l = LvInfo::parse("  vm-a-private|1073741824|7|pool00|thin|Vwi-aotz--").expect("thin");
    assert_eq!(l.name, "vm-a-private");
    assert_eq!(l.size, 1 << 30);
    assert_eq!(l.thin_id, Some(7));
    assert_eq!(l.pool.as_deref(), Some("pool00"));
    assert!(l.is_active());
    let p = LvInfo::parse("  pool00|21474836480||||thin-pool|twi-aotz--").err();
    assert!(p.is_some(), "7 fields must be refused");
    let p = LvInfo::parse("  pool00|21474836480|||thin-pool|twi---tz--").expect("pool");
    assert_eq!((p.thin_id, p.pool.is_none(), p.is_active()), (None, true, false));
    assert!(LvInfo::parse("x|12a|1|p|thin|V").is_err());
    assert!(LvInfo::parse("x|12").is_err());
}
