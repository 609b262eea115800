//! Rollback detection: an archive replaced by an older copy of itself.
//!
//! dom0's own session records are the reference: dom0 adds a session only
//! after the receiver committed it, and the newest session of a volume is
//! never pruned, so the archive must always hold dom0's newest session of
//! every volume. The archive's copy of that session's info and manifest is
//! sealed (bound to volume and session), so it cannot be forged from older
//! ones either; `verify` compares them with dom0's. An archive that lacks
//! the volume entirely (a new or wiped backup disk) is not a rollback: `send`
//! then stores the whole volume again.

use crate::meta::SessionId;
use crate::remote::Receiver;
use anyhow::{bail, Result};
use sparsebak_proto::VolumeRef;

/// The archive's committed sessions of a volume, oldest first (names it
/// cannot parse are not sessions). A session listed twice is refused: a
/// folder cannot exist twice, so the receiver is lying.
pub fn archive_sessions(rx: &mut Receiver, volume: &VolumeRef) -> Result<Vec<SessionId>> {
    let mut sessions: Vec<SessionId> =
        rx.list_sessions(volume)?.iter().filter_map(|s| SessionId::parse(s).ok()).collect();
    sessions.sort();
    if let Some(twice) = sessions.windows(2).find(|w| w[0] == w[1]) {
        bail!(
            "{}: the receiver listed session {} twice; its answer cannot be trusted",
            volume.name,
            twice[0].date_time()
        );
    }
    Ok(sessions)
}

/// The archive's sessions that dom0 has no record of: committed by a send
/// that was interrupted before dom0 recorded it (the next send adopts it or
/// leaves it be), or put there behind dom0's back. Nothing ever reads them.
pub fn unrecorded<'a>(dom0: &'a [SessionId], archive: &'a [SessionId]) -> impl Iterator<Item = &'a SessionId> {
    archive.iter().filter(|s| !dom0.contains(s))
}

/// Fails when the archive holds sessions of the volume but not dom0's newest.
pub fn check(volume: &VolumeRef, dom0: &[SessionId], archive: &[SessionId]) -> Result<()> {
    let Some(newest) = dom0.last() else { return Ok(()) };
    if archive.is_empty() || archive.contains(newest) {
        return Ok(());
    }
    let archive_newest = archive.iter().max().map_or("none", |s| s.date_time());
    bail!(
        "{}: the archive lacks session {}, the newest that dom0 recorded (the archive's newest is {archive_newest}): \
         the archive was rolled back to an older copy, or sessions were removed behind dom0's back",
        volume.name,
        newest.date_time()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_must_be_present_unless_the_archive_is_empty() {
        let v = VolumeRef { pool: "p%q".into(), name: "vol".into() };
        let s = |n: &str| SessionId::parse(n).expect("valid");
        let dom0 = [s("S_20261129-083000"), s("S_20261129-090000")];
        assert!(check(&v, &dom0, &dom0).is_ok());
        assert!(check(&v, &dom0, &[]).is_ok());
        assert!(check(&v, &dom0, &[s("S_20261129-090000")]).is_ok());
        let err = check(&v, &dom0, &[s("S_20261129-083000")]).expect_err("rolled back");
        assert!(err.to_string().contains("rolled back"), "{err}");
        assert!(check(&v, &[], &dom0).is_ok());
    }
}
