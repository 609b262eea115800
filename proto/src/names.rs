//! Validation of every name that crosses the wire. The receiver builds paths
//! from these, so anything that could leave the archive root (`/`, `..`,
//! leading dots or dashes, control characters) is refused here, once.

use anyhow::{bail, Result};

/// Longest volume name accepted (LVM's limit is 127 for the full path).
pub const MAX_NAME_LEN: usize = 112;

/// Length of `S_YYYYMMDD-HHMMSS`.
const SESSION_NAME_LEN: usize = 17;

/// Characters that do not show as themselves: control characters, and the
/// format characters that reorder or hide text (bidi overrides,
/// zero-width). Never part of a path, and escaped wherever text is shown.
pub fn is_hidden_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// A volume or LVM name: `[A-Za-z0-9+_.-]`, not starting with `-` or `.`.
pub fn validate_volume_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        bail!("invalid volume name {name:?}: must be 1 to {MAX_NAME_LEN} characters");
    }
    if name.starts_with('-') || name.starts_with('.') {
        bail!("invalid volume name {name:?}: must not start with '-' or '.'");
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-'))) {
        bail!("invalid volume name {name:?}: character {c:?} is not allowed");
    }
    Ok(())
}

/// A volume in a sub-folder of `localdir` (`appvms/work/private.img`, as a
/// Qubes file-reflink pool keeps them): a relative path of plain
/// components, each a valid volume name without `+`. A name without `/` is
/// checked as [`validate_volume_name`].
pub fn validate_volume_path(path: &str) -> Result<()> {
    if !path.contains('/') {
        return validate_volume_name(path);
    }
    for part in path.split('/') {
        validate_volume_name(part).map_err(|e| anyhow::anyhow!("invalid volume path {path:?}: {e}"))?;
        if part.contains('+') {
            bail!("invalid volume path {path:?}: a folder or file name in a path must not contain '+'");
        }
    }
    validate_volume_name(&volume_folder_name(path)).map_err(|e| anyhow::anyhow!("invalid volume path {path:?}: {e}"))
}

/// The one folder name a volume has in the archive and in dom0's metadata:
/// its path with each `/` as `+` (`appvms/work/private.img` ->
/// `appvms+work+private.img`). The receiver's checks stay those of
/// [`validate_volume_name`]; paths cannot hold `+`, so two different paths
/// never share a folder (a plain name with `+` could equal a path's: the
/// config refuses that pair).
pub fn volume_folder_name(path: &str) -> String {
    path.replace('/', "+")
}

/// A pool folder name `VG%POOL`: two valid names joined by one `%`.
pub fn validate_pool_dir(pool: &str) -> Result<()> {
    match pool.split_once('%') {
        Some((vg, p)) if !p.contains('%') => validate_volume_name(vg)
            .and_then(|_| validate_volume_name(p))
            .map_err(|e| anyhow::anyhow!("invalid pool folder {pool:?}: {e}")),
        _ => bail!("invalid pool folder {pool:?}: expected VG%POOL"),
    }
}

/// A session folder name: `S_YYYYMMDD-HHMMSS`, digits only.
pub fn validate_session_name(name: &str) -> Result<()> {
    let b = name.as_bytes();
    let ok = b.len() == SESSION_NAME_LEN
        && name.starts_with(crate::layout::SESSION_PREFIX)
        && b[10] == b'-'
        && b[2..10].iter().chain(&b[11..]).all(u8::is_ascii_digit);
    if !ok {
        bail!("invalid session name {name:?}: expected S_YYYYMMDD-HHMMSS");
    }
    Ok(())
}

/// Longest destination mount point or directory accepted.
pub const MAX_PATH_LEN: usize = 1024;

/// A relative destination directory: plain path components only.
pub fn validate_dest_dir(dir: &str) -> Result<()> {
    if dir.is_empty() || dir.starts_with('/') || dir.len() > MAX_PATH_LEN {
        bail!("invalid destination dir: must be a non-empty relative path of at most {MAX_PATH_LEN} bytes");
    }
    for part in dir.split('/') {
        if part.is_empty() || part == "." || part == ".." || part.chars().any(is_hidden_char) {
            bail!("invalid destination dir {dir:?}: bad component {part:?}");
        }
    }
    Ok(())
}

/// An S3 bucket name as AWS defines it: 3 to 63 lowercase letters, digits,
/// dots and hyphens, starting and ending with a letter or digit.
pub fn validate_bucket(name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !(3..=63).contains(&name.len())
        || !name.chars().all(ok_char)
        || !alnum(name.chars().next())
        || !alnum(name.chars().last())
    {
        bail!(
            "invalid S3 bucket name {:?}: 3 to 63 lowercase letters, digits, '.' and '-', starting and ending with a letter or digit",
            name.escape_debug().to_string()
        );
    }
    Ok(())
}

/// An absolute mount point path without `.`/`..` components.
pub fn validate_mountpoint(path: &str) -> Result<()> {
    if !path.starts_with('/') || path.len() > MAX_PATH_LEN {
        bail!("invalid destination mount point: must be an absolute path of at most {MAX_PATH_LEN} bytes");
    }
    if path.split('/').any(|p| p == "." || p == ".." || p.chars().any(is_hidden_char)) {
        bail!("invalid destination mount point {path:?}: no '.', '..' or control characters");
    }
    Ok(())
}

impl crate::msg::VolumeRef {
    /// Checks both parts; the receiver calls this before building any path.
    pub fn validate(&self) -> Result<()> {
        validate_pool_dir(&self.pool)?;
        validate_volume_name(&self.name)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bucket_names() {
        for ok in ["abc", "my-backups.2026", "0bucket9"] {
            assert!(super::validate_bucket(ok).is_ok(), "{ok}");
        }
        for bad in ["ab", "Upper", "-lead", "trail.", "sp ace", "under_score", &"a".repeat(64), "a/b"] {
            assert!(super::validate_bucket(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hidden_characters_are_not_part_of_paths() {
        assert!(validate_dest_dir("backups/\u{202e}evil").is_err());
        assert!(validate_dest_dir("back\u{200b}ups").is_err());
        assert!(validate_mountpoint("/mnt/\u{1b}x").is_err());
        assert!(validate_dest_dir("sauvegardes/été").is_ok());
        assert!(validate_dest_dir(&"d".repeat(MAX_PATH_LEN + 1)).is_err());
        assert!(validate_mountpoint(&format!("/{}", "m".repeat(MAX_PATH_LEN))).is_err());
    }

    #[test]
    fn volume_paths() {
        assert!(validate_volume_path("appvms/work/private.img").is_ok());
        assert_eq!(volume_folder_name("appvms/work/private.img"), "appvms+work+private.img");
        assert_eq!(volume_folder_name("disk+1.img"), "disk+1.img");
        assert!(validate_volume_path("disk+1.img").is_ok());
        for bad in [
            "/etc/shadow",
            "appvms/../x",
            "appvms/./x",
            "appvms//x",
            "appvms/x/",
            "appvms/.hidden/x",
            "a+b/c",
            "appvms/-x",
            "appvms/wo rk/x",
            "",
        ] {
            assert!(validate_volume_path(bad).is_err(), "{bad}");
        }
        let long = format!("{}/{}", "a".repeat(60), "b".repeat(60));
        assert!(validate_volume_path(&long).is_err(), "the folder name must fit");
    }

    use super::*;

    #[test]
    fn volume_names() {
        for ok in ["vm-untrusted-private", "a", "x+y_z.1", "root"] {
            assert!(validate_volume_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "..", ".hidden", "-opt", "a/b", "a b", "a\0b", "é", &"x".repeat(113)] {
            assert!(validate_volume_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pool_dirs() {
        assert!(validate_pool_dir("qubes_dom0%pool00").is_ok());
        for bad in ["qubes_dom0", "a%b%c", "%b", "a%", "../x%y", "a%.."] {
            assert!(validate_pool_dir(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn session_names() {
        assert!(validate_session_name("S_20261129-083000").is_ok());
        for bad in [
            "S_20261129083000",
            "S_2026112-0830000",
            "X_20261129-083000",
            "S_2026112a-083000",
            "S_20261129-083000-tmp",
            "../../etc",
        ] {
            assert!(validate_session_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn destinations() {
        assert!(validate_dest_dir("backups").is_ok());
        assert!(validate_dest_dir("a/b").is_ok());
        for bad in ["", "/abs", "a/../b", "..", "a//b", "./a"] {
            assert!(validate_dest_dir(bad).is_err(), "{bad:?}");
        }
        assert!(validate_mountpoint("/mnt/volume").is_ok());
        for bad in ["mnt", "/mnt/../etc", "/mnt/./x"] {
            assert!(validate_mountpoint(bad).is_err(), "{bad:?}");
        }
    }
}
