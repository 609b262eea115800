//! The receiver's S3 settings: endpoint and credentials never leave the
//! backup VM; dom0 names only the bucket (`desturl = s3://BUCKET/PREFIX`).
//!
//! `/etc/sparsebak-vm/s3.ini` (or the file `SPARSEBAK_VM_CONFIG` names),
//! mode 0600 (it holds a secret key), one section per bucket:
//!
//! ```ini
//! [offsite-backups]
//! endpoint = https://s3.example.net   ; omit for AWS
//! region = us-east-1
//! access_key = AKIA...
//! secret_key = ...
//! path_style = on                      ; bucket in the path, not the host name
//! timeout = 60                         ; seconds per request (1..3600)
//! retries = 3                          ; retries of a failed request (0..10)
//! ```

use anyhow::{anyhow, bail, Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the settings are unless `SPARSEBAK_VM_CONFIG` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/sparsebak-vm/s3.ini";
/// The environment variable that overrides [`DEFAULT_PATH`].
pub const PATH_VAR: &str = "SPARSEBAK_VM_CONFIG";
/// Largest settings file read.
const MAX_LEN: u64 = 64 << 10;

/// One bucket's settings.
pub struct Profile {
    pub bucket: String,
    /// `None`: AWS, from the region.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    pub path_style: bool,
    pub timeout: Duration,
    pub retries: usize,
    /// The file the settings came from, for messages.
    pub file: PathBuf,
}

pub fn settings_path() -> PathBuf {
    std::env::var_os(PATH_VAR).map_or_else(|| PathBuf::from(DEFAULT_PATH), PathBuf::from)
}

/// The settings of `bucket` from the receiver's settings file.
pub fn load(bucket: &str) -> Result<Profile> {
    let path = settings_path();
    let text = read_private(&path).with_context(|| format!("S3 settings for bucket {bucket}"))?;
    parse(&text, &path, bucket)
}

/// Reads the file, refusing one that others may read (it holds a secret).
fn read_private(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() || meta.len() > MAX_LEN {
        bail!("{} is not a settings file (not a regular file, or over {MAX_LEN} bytes)", path.display());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!("{} has mode {mode:04o}: it holds a secret key; chmod 600 it", path.display());
    }
    std::fs::read_to_string(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))
}

fn parse(text: &str, path: &Path, bucket: &str) -> Result<Profile> {
    let ini = ini::Ini::load_from_str(text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let section = ini
        .section(Some(bucket))
        .ok_or_else(|| anyhow!("{} has no section [{bucket}] for bucket {bucket}", path.display()))?;
    let get = |key: &str| section.get(key).map(str::trim).filter(|v| !v.is_empty());
    let need = |key: &str| {
        get(key).map(str::to_string).ok_or_else(|| anyhow!("{} [{bucket}]: {key} is missing", path.display()))
    };
    let number = |key: &str, default: u64, max: u64, min: u64| -> Result<u64> {
        match get(key) {
            None => Ok(default),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => bail!("{} [{bucket}]: {key} = {v:?} is not a number in {min}..={max}", path.display()),
            },
        }
    };
    let path_style = match get("path_style") {
        None | Some("off") => false,
        Some("on") => true,
        Some(v) => bail!("{} [{bucket}]: path_style = {v:?}: use on or off", path.display()),
    };
    let mut seen = Vec::new();
    for key in section.iter().map(|(k, _)| k) {
        if seen.contains(&key) {
            bail!("{} [{bucket}]: {key} appears more than once", path.display());
        }
        seen.push(key);
        if !["endpoint", "region", "access_key", "secret_key", "path_style", "timeout", "retries"].contains(&key) {
            bail!("{} [{bucket}]: unknown key {key:?}", path.display());
        }
    }
    Ok(Profile {
        bucket: bucket.to_string(),
        endpoint: get("endpoint").map(str::to_string),
        region: get("region").unwrap_or("us-east-1").to_string(),
        access_key: need("access_key")?,
        secret_key: need("secret_key")?,
        path_style,
        timeout: Duration::from_secs(number("timeout", 60, 3600, 1)?),
        retries: number("retries", 3, 10, 0)? as usize,
        file: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[b1]\nendpoint = http://127.0.0.1:7480\naccess_key = a\nsecret_key = s\npath_style = on\n";

    #[test]
    fn a_bucket_section_parses_with_defaults() {
        let p = parse(TEXT, Path::new("/x/s3.ini"), "b1").expect("parses");
        assert_eq!(p.endpoint.as_deref(), Some("http://127.0.0.1:7480"));
        assert_eq!((p.region.as_str(), p.path_style, p.timeout.as_secs(), p.retries), ("us-east-1", true, 60, 3));
    }

    #[test]
    fn errors_name_file_and_bucket() {
        let err = parse(TEXT, Path::new("/x/s3.ini"), "other").err().expect("no section").to_string();
        assert!(err.contains("/x/s3.ini") && err.contains("[other]"), "{err}");
        let err = parse(&TEXT.replace("secret_key = s\n", ""), Path::new("/x/s3.ini"), "b1").err().expect("missing");
        assert!(err.to_string().contains("secret_key is missing"), "{err}");
        assert!(parse(&format!("{TEXT}timeout = 0\n"), Path::new("f"), "b1").is_err());
        assert!(parse(&TEXT.replace("path_style = on", "path_style = yes"), Path::new("f"), "b1").is_err());
        let twice = parse(&format!("{TEXT}secret_key = t\n"), Path::new("f"), "b1").err().expect("twice");
        assert!(twice.to_string().contains("more than once"), "{twice}");
        assert!(parse(&format!("{TEXT}secret = x\n"), Path::new("f"), "b1").is_err(), "unknown key");
    }

    #[test]
    fn the_file_must_be_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s3.ini");
        std::fs::write(&path, TEXT).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = read_private(&path).expect_err("refused").to_string();
        assert!(err.contains("mode 0644") && err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(read_private(&path).is_ok());
        let err = read_private(&dir.path().join("missing.ini")).expect_err("missing").to_string();
        assert!(err.contains("missing.ini"), "{err}");
    }
}
