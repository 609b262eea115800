//! Every name on disk that both sides use, defined once: dom0's metadata
//! folder and the receiver's archive share the session folder shape, the key
//! file, the prune journal and the suffixes that mark folders in transition.
//! No other file spells these names; path joining stays with each side.
//!
//! ```text
//! ARCHIVE ROOT (MOUNT/DIR)/.sparsebak-format            archive format marker
//!   VG%POOL/.sparsebak-key                              wrapped key (encrypted archives)
//!   VG%POOL/VOLUME/prune.journal                        an unsettled prune
//!   VG%POOL/VOLUME/S_YYYYMMDD-HHMMSS/info
//!                                   /manifest
//!                                   /<first 9 hex digits>/x<16 hex digits of the byte address>
//!                                   /chunks.tar         (tar sessions)
//!                                   /chunks.tar.idx     (its index, receiver only)
//! ```

/// Prefix of a session folder name (`S_YYYYMMDD-HHMMSS`).
pub const SESSION_PREFIX: &str = "S_";

/// Suffix of a session folder that is still being written; renamed away on
/// commit.
pub const TMP_SUFFIX: &str = "-tmp";

/// Suffix of a pruned session folder on its way out (no longer a session).
pub const PRUNED_SUFFIX: &str = "-pruned";

/// The per-volume prune journal, on both sides.
pub const PRUNE_JOURNAL: &str = "prune.journal";

/// The key file of a pool folder: the raw key in dom0, the wrapped key in
/// the archive. Volume names cannot start with a dot, so it never collides
/// with a volume.
pub const KEY_FILE: &str = ".sparsebak-key";

/// The session's info file (volume size, chunk size, format, ...).
pub const INFO_FILE: &str = "info";

/// The session's manifest (one line per chunk, sorted by address).
pub const MANIFEST_FILE: &str = "manifest";

/// The tar stream of a `--tarfile` session.
pub const TAR_FILE: &str = "chunks.tar";

/// The index of a tar session's [`TAR_FILE`], beside it: where each chunk
/// lies in the tar, sorted by address (only the receiver reads it).
pub const TAR_INDEX_FILE: &str = "chunks.tar.idx";

/// The archive-level format marker in the archive root.
pub const FORMAT_MARKER: &str = ".sparsebak-format";

/// Version of the archive as a whole (what [`FORMAT_MARKER`] holds). The
/// files inside carry their own versions where they have a format of their
/// own (`info`, the key file, dom0's delta map); an archive made before the
/// marker existed is version 1.
pub const ARCHIVE_FORMAT_VERSION: u32 = 1;

/// A format version as a file spells it: decimal digits only, no sign, no
/// leading zero, at least 1. Anything else is damage, never "version 1".
pub fn parse_version(text: &str) -> Option<u32> {
    let digits_only = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || text.starts_with('0') {
        return None;
    }
    text.parse().ok()
}

/// The version a file declares in its `version=` field: 1 when the field is
/// absent (files written before versions existed), an error when it holds
/// anything but a version.
pub fn declared_version(field: Option<&str>) -> anyhow::Result<u32> {
    match field {
        None => Ok(1),
        Some(v) => parse_version(v).ok_or_else(|| anyhow::anyhow!("bad format version {v:?}")),
    }
}

/// Refuses a file whose format `found` is newer than `supported`, naming the
/// file and both versions. Older versions are for the caller to read.
pub fn check_format_version(file: &std::path::Path, found: u32, supported: u32) -> anyhow::Result<()> {
    if found > supported {
        anyhow::bail!(
            "{}: format version {found} is newer than this sparsebak supports (version {supported}); upgrade sparsebak",
            file.display()
        );
    }
    Ok(())
}

/// The name a volume folder is renamed to while it is being deleted: never
/// a valid volume name (leading dot), so a half-deleted volume never looks
/// like one.
pub fn deleted_name(volume: &str) -> String {
    format!(".{volume}-deleted")
}

/// A session folder's name: `S_` + `YYYYMMDD-HHMMSS`.
pub fn session_folder(datetime: &str) -> String {
    format!("{SESSION_PREFIX}{datetime}")
}

/// A chunk's path relative to its session folder:
/// `<first 9 hex digits>/x<16 hex digits of the byte address>`. Also its
/// member name in a tar session.
pub fn chunk_rel_path(addr: u64) -> String {
    let hex = format!("{addr:016x}");
    format!("{}/x{hex}", &hex[..9])
}

/// The address written the way manifests and chunk files spell it:
/// `x<16 hex digits>`.
pub fn addr_token(addr: u64) -> String {
    format!("x{addr:016x}")
}

/// The address in a token written by [`addr_token`]: `x` and exactly 16
/// lowercase hex digits (no sign, nothing else).
pub fn parse_addr_token(token: &str) -> Option<u64> {
    let hex = token.strip_prefix('x')?;
    let well_formed = hex.len() == 16 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !well_formed {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_paths_group_by_address_prefix() {
        assert_eq!(chunk_rel_path(0x1_2345_6789_0000), "000123456/x0001234567890000");
        assert_eq!(chunk_rel_path(0), "000000000/x0000000000000000");
        assert_eq!(addr_token(0x20000), "x0000000000020000");
        assert_eq!(parse_addr_token(&addr_token(0xdead_beef_0000)), Some(0xdead_beef_0000));
        for bad in
            ["0000000000020000", "x000000000002000", "x+000000000002000", "x000000000002000G", "x00000000000A0000"]
        {
            assert_eq!(parse_addr_token(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn versions_are_plain_decimal_from_one() {
        assert_eq!(parse_version("1"), Some(1));
        assert_eq!(parse_version("12"), Some(12));
        for bad in ["", "0", "01", "+1", "-1", " 1", "1 ", "1x", "99999999999"] {
            assert_eq!(parse_version(bad), None, "{bad:?}");
            assert!(declared_version(Some(bad)).is_err(), "{bad:?}");
        }
        assert_eq!(declared_version(None).expect("absent"), 1);
        assert_eq!(declared_version(Some("3")).expect("three"), 3);
    }

    #[test]
    fn newer_format_is_refused_naming_file_and_versions() {
        let p = std::path::Path::new("/a/info");
        assert!(check_format_version(p, 1, 1).is_ok());
        assert!(check_format_version(p, 0, 1).is_ok());
        let msg = check_format_version(p, 7, 1).expect_err("newer").to_string();
        assert!(msg.contains("/a/info") && msg.contains('7') && msg.contains("version 1"), "{msg}");
    }

    #[test]
    fn deleted_and_session_names() {
        assert_eq!(deleted_name("vm-a"), ".vm-a-deleted");
        assert_eq!(session_folder("20260101-000000"), "S_20260101-000000");
        assert!(crate::names::validate_volume_name(&deleted_name("vm-a")).is_err());
    }
}
