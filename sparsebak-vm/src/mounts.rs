//! Is a path a mount point? The receiver refuses to write into an unmounted
//! destination: filling the VM's root filesystem instead of the backup disk
//! would look like success and lose the backup.

use anyhow::{Context, Result};
use std::path::Path;

/// True when `path` is listed as a mount point in /proc/self/mountinfo.
pub fn is_mount_point(path: &Path) -> Result<bool> {
    let canonical = path.canonicalize().with_context(|| format!("destination mount point {}", path.display()))?;
    let table = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let want = canonical.to_string_lossy();
    Ok(table.lines().filter_map(|line| line.split(' ').nth(4)).any(|field| unescape_octal(field) == want))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = bytes[i + 1..i + 4].iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_a_mount_point_and_a_plain_dir_is_not() {
        assert!(is_mount_point(Path::new("/")).expect("reads mountinfo"));
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("plain");
        std::fs::create_dir(&sub).expect("mkdir");
        assert!(!is_mount_point(&sub).expect("reads mountinfo"));
    }

    #[test]
    fn unescapes_spaces() {
        assert_eq!(unescape_octal(r"/mnt/my\040disk"), "/mnt/my disk");
        assert_eq!(unescape_octal(r"/plain"), "/plain");
        assert_eq!(unescape_octal(r"/trail\04"), r"/trail\04");
    }
}
