//! Backup cycles through the real binaries: several sessions with random,
//! text, zero and sparse regions, growth and shrink, each restored
//! bit-identical.

mod common;
use common::*;

const CHUNK: u64 = 128 * 1024;

/// Builds the first image: random, text, written zeros, a hole, random,
/// and a partial last chunk.
fn build_image(env: &Env) {
    let img = env.image();
    write_at(&img, 0, &random_bytes(1, 4 * MIB as usize));
    write_at(&img, 4 * MIB, &text_bytes(1, 2 * MIB as usize));
    write_at(&img, 6 * MIB, &vec![0u8; 2 * MIB as usize]);
    // 8..16 MiB stays a hole.
    write_at(&img, 16 * MIB, &random_bytes(2, MIB as usize + 1000));
}

#[test]
fn sessions_restore_bit_identical_through_growth_and_shrink() {
    let env = Env::new(256);
    build_image(&env);
    let mut copies = Vec::new();

    // 1: full. Stored chunks: 32 random + 16 text + 8 random + 1 partial.
    env.ok(&["send"]);
    assert_eq!(env.last_stored_chunks(), 32 + 16 + 8 + 1);
    copies.push(env.snapshot_image("s1"));

    // 2: three chunks change (4 KiB each, in three different chunks).
    for (i, off) in [CHUNK * 3 + 100, 5 * MIB, 16 * MIB + CHUNK * 2].iter().enumerate() {
        write_at(&env.image(), *off, &random_bytes(10 + i as u64, 4096));
    }
    env.ok(&["send"]);
    assert_eq!(env.last_stored_chunks(), 3, "only the changed chunks are stored");
    copies.push(env.snapshot_image("s2"));

    // A send with no change creates no session.
    env.ok(&["send"]);
    assert_eq!(env.sessions().len(), 2);

    // 3: growth to 24 MiB + 777 bytes, data in the new tail.
    set_len(&env.image(), 24 * MIB + 777);
    write_at(&env.image(), 20 * MIB, &random_bytes(3, MIB as usize));
    write_at(&env.image(), 24 * MIB, &random_bytes(4, 777));
    env.ok(&["send"]);
    copies.push(env.snapshot_image("s3"));

    // 4: shrink to 10 MiB + 300 bytes (cuts a chunk in the middle of a hole).
    set_len(&env.image(), 10 * MIB + 300);
    env.ok(&["send"]);
    copies.push(env.snapshot_image("s4"));

    // 5: grow again without writing the tail: old data must not reappear.
    set_len(&env.image(), 24 * MIB + 777);
    write_at(&env.image(), 12 * MIB, &text_bytes(99, 300_000));
    env.ok(&["send"]);
    copies.push(env.snapshot_image("s5"));

    // 6: a hole punched where random data was: those chunks become zeros.
    punch_hole(&env.image(), 0, MIB);
    env.ok(&["send"]);
    assert_eq!(env.last_stored_chunks(), 0, "zeroed chunks are recorded, not stored");
    copies.push(env.snapshot_image("s6"));

    let sessions = env.sessions();
    assert_eq!(sessions.len(), copies.len());
    assert!(sessions.windows(2).all(|w| w[0] < w[1]), "session names strictly increase: {sessions:?}");

    for (i, (session, copy)) in sessions.iter().zip(&copies).enumerate() {
        let restored = env.receive(Some(session), &format!("r{i}"));
        assert_same_file(&restored, copy);
        env.ok(&["verify", VOL, &format!("--session={session}")]);
    }
    // Latest by default, and restores stay sparse.
    let latest = env.receive(None, "latest");
    assert_same_file(&latest, copies.last().expect("copies"));
    assert!(
        allocated_bytes(&latest) < 16 * MIB,
        "restored file should be sparse, allocates {} bytes",
        allocated_bytes(&latest)
    );
}

#[test]
fn sparse_terabyte_image_costs_what_its_data_costs() {
    let env = Env::new(64);
    set_len(&env.image(), 1 << 40);
    write_at(&env.image(), 1 << 30, &random_bytes(5, MIB as usize));
    write_at(&env.image(), (1 << 40) - 4096, &text_bytes(1, 4096));
    let started = std::time::Instant::now();
    env.ok(&["send"]);
    assert_eq!(env.last_stored_chunks(), 8 + 1);
    // The manifest lists only the data chunks: a few lines, not 8 million.
    let meta_session = std::fs::read_dir(env.meta_volume_dir()).expect("meta").next().expect("session").expect("entry");
    let manifest = std::fs::read_to_string(meta_session.path().join("manifest")).expect("manifest");
    assert_eq!(manifest.lines().count(), 9);
    // A second send re-reads only the data regions.
    write_at(&env.image(), (1 << 30) + 5000, b"changed");
    env.ok(&["send"]);
    assert_eq!(env.last_stored_chunks(), 1);
    let restored = env.receive(None, "big");
    assert_same_file(&restored, &env.image());
    assert!(allocated_bytes(&restored) < 8 * MIB);
    eprintln!("1 TiB sparse cycle took {:?}", started.elapsed());
}

#[test]
fn options_may_follow_the_command_and_volume() {
    let env = Env::new(64);
    write_at(&env.image(), 0, &random_bytes(7, 3 * MIB as usize));
    env.ok(&["send", VOL, "-q"]);
    let dest = env.path("out/after.img");
    let save = format!("--save-to={}", dest.display());
    env.ok(&["receive", VOL, &save, "-u"]);
    assert_same_file(&dest, &env.image());
    let dest2 = env.path("out/before.img");
    let save2 = format!("--save-to={}", dest2.display());
    env.ok(&[&save2, "-u", "receive", VOL]);
    assert_same_file(&dest2, &env.image());
    let version = env.ok(&["version"]);
    assert!(version.contains("sparsebak "), "{version}");
}

/// A loop device over a file filled with 0xff: receive must write every
/// byte of the volume, zeros included (a block device has no holes).
#[test]
fn receive_onto_a_block_device_overwrites_old_data() {
    let env = Env::new(64);
    write_at(&env.image(), 0, &random_bytes(21, MIB as usize));
    write_at(&env.image(), 3 * MIB, &text_bytes(3, 300_000));
    set_len(&env.image(), 5 * MIB);
    env.ok(&["send"]);
    let backing = env.path("out/backing");
    std::fs::write(&backing, vec![0xffu8; 8 * MIB as usize]).expect("backing file");
    let out = std::process::Command::new("losetup").args(["--find", "--show"]).arg(&backing).output().expect("losetup");
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let detach = || {
        let _ = std::process::Command::new("losetup").args(["-d", &dev]).status();
    };
    let result = std::panic::catch_unwind(|| {
        env.ok(&["receive", VOL, "-u", &format!("--save-to={dev}")]);
        let restored = std::fs::read(&backing).expect("read backing");
        let image = std::fs::read(env.image()).expect("read image");
        assert!(restored[..image.len()] == image[..], "device holds the volume, zeros written");
        assert!(restored[image.len()..].iter().all(|&b| b == 0xff), "bytes past the volume untouched");
        let small = env.path("out/small");
        std::fs::write(&small, vec![0u8; MIB as usize]).expect("small");
        small
    });
    detach();
    let small = result.expect("block device receive");
    // A device smaller than the volume is refused.
    let out = std::process::Command::new("losetup").args(["--find", "--show"]).arg(&small).output().expect("losetup");
    let dev2 = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let err = env.fails(&["receive", VOL, "-u", &format!("--save-to={dev2}")]);
    let _ = std::process::Command::new("losetup").args(["-d", &dev2]).status();
    assert!(err.contains("holds") && err.contains("needs"), "{err}");
}

/// Volumes in sub-folders of `localdir`, as a Qubes file-reflink pool keeps
/// them: every command takes the path; the archive and dom0's metadata
/// hold each under one folder name (`appvms+work+private.img`).
#[test]
fn volumes_in_sub_folders_work_with_every_command() {
    let env = Env::new(64);
    let (work, root) = ("appvms/work/private.img", "vm-templates/fedora/root.img");
    for (vol, seed) in [(work, 20), (root, 21)] {
        let path = env.path("images").join(vol);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        write_at(&path, 0, &random_bytes(seed, 2 * MIB as usize));
    }
    env.write_config(&env.mnt(), &[(work, "enable"), (root, "enable")]);
    env.ok(&["send"]);
    write_at(&env.path("images").join(work), MIB, &random_bytes(22, 4096));
    env.ok(&["send", work]);
    let archive_pool = env.mnt().join("backups/local%images");
    assert!(archive_pool.join("appvms+work+private.img").is_dir());
    assert!(archive_pool.join("vm-templates+fedora+root.img").is_dir());
    assert!(env.path("meta/local%images/appvms+work+private.img").is_dir());

    let listed = env.ok(&["list"]);
    assert!(listed.contains("appvms/work/private.img  sessions=2"), "{listed}");
    assert!(listed.contains("vm-templates/fedora/root.img  sessions=1"), "{listed}");
    assert!(!listed.contains('+'), "listed under the configured names: {listed}");
    env.ok(&["verify", work]);
    let out = env.path("out/work.img");
    env.ok(&["receive", work, "-u", &format!("--save-to={}", out.display())]);
    assert_same_file(&env.path("images").join(work), &out);
    let first = env.ok(&["list", work]).lines().next().expect("a session").split_whitespace().next().map(String::from);
    env.ok(&["prune", work, &format!("--session={}", first.expect("date"))]);
    env.ok(&["verify", work]);
    env.ok(&["delete", "-u", root]);
    assert!(!archive_pool.join("vm-templates+fedora+root.img").exists());
    for bad in ["appvms/../x.img", "/etc/shadow"] {
        let err = env.fails(&["list", bad]);
        assert!(err.contains("invalid volume"), "{bad}: {err}");
    }
}
