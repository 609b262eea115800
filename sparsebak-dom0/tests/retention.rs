//! Retention through the real binaries: keep rules (`prune --keep-*`, the
//! config's `[retention]`, `send --autoprune`), tags that protect a session,
//! `list --json`, and multi-session prunes killed at any step. Sessions are
//! made hours and days apart with the `SPARSEBAK_TEST_NOW` clock hook.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::PathBuf;

const CHUNK: u64 = 128 * 1024;

/// Session date-time -> copy of the image as it was sent.
type Copies = BTreeMap<String, PathBuf>;

/// Changes one chunk and sends at `time` (RFC 3339); returns the session.
fn send_at(env: &Env, copies: &mut Copies, time: &str, extra: &[&str]) -> String {
    static SENDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SENDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    write_at(&env.image(), (n % 16) * CHUNK + 10, &random_bytes(500 + n, 4096));
    let newest_before = env.sessions().last().cloned();
    let pass = format!("--passphrase-file={}", env.passphrase_file().display());
    let mut args = vec!["send", pass.as_str()];
    args.extend_from_slice(extra);
    let out = env.run_env(&args, &[("SPARSEBAK_TEST_NOW", time)]);
    assert!(out.status.success(), "send at {time}: {}", String::from_utf8_lossy(&out.stderr));
    let s = env.sessions().last().expect("a session").clone();
    assert_ne!(Some(&s), newest_before.as_ref(), "send at {time} made a session");
    copies.insert(s.clone(), env.snapshot_image(&s));
    s
}

/// Every listed session restores as it was sent, and only those are listed.
fn check_all(env: &Env, copies: &Copies) {
    let listed = env.sessions();
    assert_eq!(listed, copies.keys().cloned().collect::<Vec<_>>(), "listed sessions");
    for s in &listed {
        let restored = env.receive(Some(s), &format!("check-{s}"));
        assert_same_file(&restored, &copies[s]);
        std::fs::remove_file(&restored).expect("remove");
    }
}

/// A small image and sessions at the given times.
fn env_with_sessions(times: &[&str]) -> (Env, Copies) {
    let env = Env::new(128);
    write_at(&env.image(), 0, &random_bytes(400, 2 * MIB as usize));
    let mut copies = Copies::new();
    for t in times {
        send_at(&env, &mut copies, t, &[]);
    }
    (env, copies)
}

/// The dry run's lines: session -> "keep (...)" / "prune".
fn dry_run(env: &Env, rules: &[&str]) -> BTreeMap<String, String> {
    let mut args = vec!["prune", VOL, "--dry-run"];
    args.extend_from_slice(rules);
    let out = env.run(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    stdout
        .lines()
        .map(|l| {
            let mut parts = l.splitn(3, ' ');
            assert_eq!(parts.next(), Some(VOL), "{l}");
            let dt = parts.next().expect("session").to_string();
            (dt, parts.next().expect("decision").to_string())
        })
        .collect()
}

#[test]
fn keep_rules_prune_what_no_rule_keeps_and_the_rest_restores() {
    // Two sessions a day for 12 days, plus three in the last hour.
    let mut times = Vec::new();
    for d in 1..=12 {
        for h in [6, 18] {
            times.push(format!("2026-01-{d:02}T{h:02}:00:00Z"));
        }
    }
    for m in [10, 20, 30] {
        times.push(format!("2026-01-12T19:{m:02}:00Z"));
    }
    let refs: Vec<&str> = times.iter().map(String::as_str).collect();
    let (env, mut copies) = env_with_sessions(&refs);
    let rules = ["--keep-last=2", "--keep-daily=5", "--keep-weekly=2"];
    let plan = dry_run(&env, &rules);
    assert_eq!(plan.len(), copies.len(), "one line per session");
    assert_eq!(env.sessions().len(), copies.len(), "a dry run changes nothing");
    // The newest is kept as the newest; the two newest by `last`; the
    // newest of each of the last 5 days (Jan 8..12) by `daily`; ISO weeks
    // 2026-W02 (Jan 5..11) and W03 (Jan 12..) by `weekly`.
    assert_eq!(plan["20260112-193000"], "keep (newest)");
    assert!(plan["20260112-192000"].contains("last"), "{plan:?}");
    for d in 8..=11 {
        assert!(plan[&format!("202601{d:02}-180000")].contains("daily"), "{plan:?}");
    }
    assert!(plan["20260111-180000"].contains("weekly"), "newest of W02: {plan:?}");
    assert_eq!(plan["20260112-191000"], "prune");
    assert_eq!(plan["20260107-180000"], "prune");
    assert_eq!(plan["20260101-060000"], "prune");
    let kept: Vec<String> = plan.iter().filter(|(_, d)| d.starts_with("keep")).map(|(s, _)| s.clone()).collect();

    let mut args = vec!["prune", VOL];
    args.extend_from_slice(&rules);
    env.ok(&args);
    assert_eq!(env.sessions(), kept, "exactly the sessions the dry run kept");
    copies.retain(|s, _| kept.contains(s));
    check_all(&env, &copies);
    env.ok(&["verify", VOL]);
    // Applied again, the rules keep everything.
    env.ok(&args);
    assert_eq!(env.sessions(), kept);

    let err = env.fails(&["prune", VOL, "--keep-last=1", "--session=20260112-193000"]);
    assert!(err.contains("do not mix"), "{err}");
    let err = env.fails(&["prune", VOL]);
    assert!(err.contains("prune needs --session"), "{err}");
    let err = env.fails(&["send", "--keep-last=1"]);
    assert!(err.contains("--keep-* does not apply to send"), "{err}");
}

#[test]
fn tags_protect_sessions_and_survive_recover() {
    let (env, mut copies) = env_with_sessions(&["2026-02-01T10:00:00Z", "2026-02-02T10:00:00Z"]);
    let third = send_at(&env, &mut copies, "2026-02-03T10:00:00Z", &["--tag=before-upgrade"]);
    send_at(&env, &mut copies, "2026-02-04T10:00:00Z", &[]);
    let first = env.sessions()[0].clone();
    env.ok(&["tag", VOL, &first, "yearly-2026"]);
    let listed = env.ok(&["list", VOL]);
    let stdout = String::from_utf8_lossy(&env.run(&["list", VOL]).stdout).into_owned();
    assert!(stdout.contains(&format!("{first}  ")) && stdout.contains("tags=yearly-2026"), "{stdout}{listed}");
    assert!(stdout.contains("tags=before-upgrade"), "{stdout}");
    for bad in ["a b", "x/y", "", &"t".repeat(33)] {
        let err = env.fails(&["tag", VOL, &first, bad]);
        assert!(err.contains("invalid tag"), "{bad:?}: {err}");
    }
    // A tagged session: `prune --session` refuses it, rules keep it.
    let err = env.fails(&["prune", VOL, &format!("--session={third}")]);
    assert!(err.contains("is tagged before-upgrade") && err.contains("untag"), "{err}");
    assert_eq!(env.sessions().len(), 4, "nothing pruned");
    env.ok(&["prune", VOL, "--keep-last=1"]);
    let kept = env.sessions();
    assert_eq!(kept, vec![first.clone(), third.clone(), copies.keys().last().expect("newest").clone()]);
    copies.retain(|s, _| kept.contains(s));
    check_all(&env, &copies);
    env.ok(&["verify", VOL]);

    // The tags are in the archive's sealed info too: recover brings them back.
    env.lose_dom0_metadata();
    env.ok(&["recover"]);
    let json = String::from_utf8_lossy(&env.run(&["list", "--json", VOL]).stdout).into_owned();
    let doc: serde_json::Value = serde_json::from_str(&json).expect("list --json is JSON");
    let sessions = doc["volumes"][0]["sessions"].as_array().expect("sessions");
    assert_eq!(sessions.len(), 3, "{json}");
    assert_eq!(sessions[0]["tags"], serde_json::json!(["yearly-2026"]), "{json}");
    assert_eq!(sessions[1]["tags"], serde_json::json!(["before-upgrade"]), "{json}");
    // untag, then the rules may prune it.
    env.ok(&["untag", VOL, &third, "before-upgrade"]);
    env.ok(&["verify", VOL]);
    env.ok(&["prune", VOL, "--keep-last=1"]);
    assert_eq!(env.sessions(), vec![first, kept[2].clone()]);
}

#[test]
fn tag_change_killed_midway_is_finished_by_the_next_command() {
    let (env, _) = env_with_sessions(&["2026-03-01T10:00:00Z", "2026-03-02T10:00:00Z"]);
    let s = env.sessions()[0].clone();
    for k in 1..=2 {
        let tag = format!("t{k}");
        let out = env.run_env(&["tag", VOL, &s, &tag], &[("SPARSEBAK_TEST_STOP_AFTER", &k.to_string())]);
        assert!(!out.status.success(), "stopped at step {k}");
        // The next command that talks to the receiver (here verify) finishes it.
        let err = env.ok(&["verify", VOL]);
        assert!(err.contains("finishing the interrupted tag change"), "{err}");
        let stdout = String::from_utf8_lossy(&env.run(&["list", VOL]).stdout).into_owned();
        assert!(
            stdout.contains(&format!("tags={}", (1..=k).map(|i| format!("t{i}")).collect::<Vec<_>>().join(","))),
            "{stdout}"
        );
    }
}

#[test]
fn autoprune_after_each_send_applies_the_configured_rules() {
    let env = Env::new(128);
    env.write_config_with(&env.mnt(), &[(VOL, "enable")], "autoprune = on\n[retention]\nlast = 3\nmonthly = 2\n");
    write_at(&env.image(), 0, &random_bytes(600, 2 * MIB as usize));
    let mut copies = Copies::new();
    for d in 1..=6 {
        send_at(&env, &mut copies, &format!("2026-04-{d:02}T10:00:00Z"), &[]);
    }
    send_at(&env, &mut copies, "2026-05-01T10:00:00Z", &[]);
    // After each send: last=3 keeps the three newest, monthly=2 the newest
    // of each of the last two months with sessions (April 6, May 1).
    let kept = env.sessions();
    assert_eq!(kept, vec!["20260405-100000", "20260406-100000", "20260501-100000"]);
    copies.retain(|s, _| kept.contains(s));
    check_all(&env, &copies);
}

#[test]
fn autoprune_failure_is_reported_not_fatal() {
    let env = Env::new(128);
    env.write_config_with(&env.mnt(), &[(VOL, "enable")], "[retention]\nlast = 1\n");
    write_at(&env.image(), 0, &random_bytes(700, 2 * MIB as usize));
    let mut copies = Copies::new();
    send_at(&env, &mut copies, "2026-06-01T10:00:00Z", &[]);
    std::fs::write(env.archive_volume_dir().join("prune.journal"), "garbage\n").expect("plant journal");
    write_at(&env.image(), 0, &random_bytes(701, 4096));
    let pass = format!("--passphrase-file={}", env.passphrase_file().display());
    let out = env.run_env(&["send", &pass, "--autoprune"], &[("SPARSEBAK_TEST_NOW", "2026-06-02T10:00:00Z")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a failed autoprune does not fail the send: {err}");
    assert!(err.contains("autoprune failed (the new session stands)"), "{err}");
    assert_eq!(env.sessions().len(), 2, "the new session is recorded, nothing pruned");
}

#[test]
fn multi_session_prune_killed_at_any_step_is_finished_by_the_next_run() {
    let env = Env::new(256);
    write_at(&env.image(), 0, &random_bytes(800, 2 * MIB as usize));
    let mut copies = Copies::new();
    let mut day = 1;
    let mut next_time = || {
        day += 1;
        format!("2026-07-{:02}T{:02}:00:00Z", 1 + day / 24, day % 24)
    };
    send_at(&env, &mut copies, &next_time(), &[]);
    for k in (1..=28).step_by(3) {
        for _ in 0..3 {
            send_at(&env, &mut copies, &next_time(), &[]);
        }
        // Prunes 3 sessions (10 steps each); stopped at step k.
        let keep = (env.sessions().len() - 3).to_string();
        let out = env
            .run_env(&["prune", VOL, &format!("--keep-last={keep}")], &[("SPARSEBAK_TEST_STOP_AFTER", &k.to_string())]);
        assert!(!out.status.success(), "k={k}: stopped");
        // Whatever dom0 lists restores; the next run finishes the job.
        env.ok(&["prune", VOL, &format!("--keep-last={keep}")]);
        let listed = env.sessions();
        assert_eq!(listed.len().to_string(), keep, "k={k}");
        copies.retain(|s, _| listed.contains(s));
        check_all(&env, &copies);
    }
    env.ok(&["verify", VOL]);
}

#[test]
fn list_json_describes_volumes_and_sessions() {
    let (env, _) = env_with_sessions(&["2026-08-01T10:00:00Z"]);
    let out = env.run(&["list", "--json"]);
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(doc["format"], 1);
    assert_eq!(doc["pool"], "local%images");
    let v = &doc["volumes"][0];
    assert_eq!(v["name"], VOL);
    assert_eq!(v["folder"], VOL);
    assert_eq!(v["configured"], true);
    assert_eq!(v["enabled"], true);
    assert_eq!(v["present"], "yes");
    let s = &v["sessions"][0];
    assert_eq!(s["session"], "20260801-100000");
    assert_eq!(s["time"], "2026-08-01T10:00:00Z");
    assert_eq!(s["format"], "folders");
    assert_eq!(s["volume_size"], 2 * MIB);
    assert_eq!(s["chunk_size"], CHUNK);
    assert_eq!(s["chunks"], 16);
    assert!(s["bytes"].as_u64().expect("bytes") > 2 * MIB);
    assert_eq!(s["zeros"], 0);
    assert_eq!(s["tags"], serde_json::json!([]));
}
