//! Session names and the `info` file that describes a session.

use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use sparsebak_proto::{layout, names};

/// The date-time part of a session name, after `layout::SESSION_PREFIX`.
const DATE_TIME_FORMAT: &str = "%Y%m%d-%H%M%S";

/// A session name `S_YYYYMMDD-HHMMSS` (UTC). Ordering by name is ordering by time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(String);

impl SessionId {
    pub fn parse(name: &str) -> Result<SessionId> {
        names::validate_session_name(name)?;
        let id = SessionId(name.to_string());
        id.time().map_err(|e| anyhow!("invalid session name {name:?}: {e}"))?;
        Ok(id)
    }

    /// Accepts `YYYYMMDD-HHMMSS` (as `list` prints it) or `S_YYYYMMDD-HHMMSS`.
    pub fn from_user(dt: &str) -> Result<SessionId> {
        let name = if dt.starts_with(layout::SESSION_PREFIX) { dt.to_string() } else { layout::session_folder(dt) };
        Self::parse(&name).map_err(|_| anyhow!("invalid session {dt:?}: expected YYYYMMDD-HHMMSS"))
    }

    /// The name for a new session at `now`, strictly after `latest` (two
    /// sends in the same second get distinct names).
    pub fn next(now: DateTime<Utc>, latest: Option<&SessionId>) -> Result<SessionId> {
        let mut t = now.naive_utc();
        if let Some(latest) = latest {
            let last = latest.time().map_err(|e| anyhow!("session {}: {e}", latest.0))?;
            if t.and_utc().timestamp() <= last.and_utc().timestamp() {
                t = last + TimeDelta::seconds(1);
            }
        }
        Ok(SessionId(layout::session_folder(&t.format(DATE_TIME_FORMAT).to_string())))
    }

    fn time(&self) -> chrono::ParseResult<NaiveDateTime> {
        NaiveDateTime::parse_from_str(self.date_time(), DATE_TIME_FORMAT)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The session's time in RFC 3339 (`2026-11-29T08:30:00Z`).
    pub fn rfc3339(&self) -> String {
        match self.time() {
            Ok(t) => t.and_utc().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            // Unreachable for a parsed id (`parse` checks the time).
            Err(_) => self.date_time().to_string(),
        }
    }

    /// `YYYYMMDD-HHMMSS`, as shown to users.
    pub fn date_time(&self) -> &str {
        self.0.strip_prefix(layout::SESSION_PREFIX).unwrap_or(&self.0)
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Storage format of a session in the archive (`format=` in `info`).
pub use sparsebak_proto::StoreFormat as SessionFormat;

impl SessionInfo {
    /// The format's name, in `info` files and in `list`.
    pub fn format_name(&self) -> &'static str {
        match self.format {
            SessionFormat::Folders => "folders",
            SessionFormat::Tar => "tar",
        }
    }
}

/// Version of the `info` format. Version 1 files written before versions
/// existed have no `version=` line; that still means version 1.
pub const INFO_VERSION: u32 = 1;

/// The `info` file of a session: `key=value` lines, `version=` first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub format: SessionFormat,
    pub chunk_size: u64,
    pub volume_size: u64,
    pub previous: Option<SessionId>,
    /// Chunks stored (non-zero) in this session.
    pub chunks: u64,
    /// Bytes stored (compressed) in this session.
    pub bytes: u64,
    /// All-zero chunks recorded (not stored) in this session.
    pub zeros: u64,
    /// Labels given by `send --tag` / `tag`; a tagged session is kept by
    /// every rule-based prune. Written as a `tags=a,b` line only when there
    /// are any, so untagged sessions keep the exact text of before (older
    /// readers ignore the line).
    pub tags: Vec<String>,
}

/// Longest tag name.
pub const MAX_TAG_LEN: usize = 32;
/// Most tags on one session.
pub const MAX_TAGS: usize = 16;

/// A tag name: 1 to [`MAX_TAG_LEN`] letters, digits, `-`, `_` or `.`.
pub fn validate_tag(tag: &str) -> Result<()> {
    let ok = !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("invalid tag {tag:?}: 1 to {MAX_TAG_LEN} letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

impl SessionInfo {
    pub fn to_text(&self) -> String {
        let format = self.format_name();
        let previous = self.previous.as_ref().map_or("none", |p| p.as_str());
        let mut text = format!(
            "version={INFO_VERSION}\nformat={format}\nchunksize={}\nvolsize={}\nprevious={previous}\nchunks={}\nbytes={}\nzeros={}\n",
            self.chunk_size, self.volume_size, self.chunks, self.bytes, self.zeros
        );
        if !self.tags.is_empty() {
            text.push_str(&format!("tags={}\n", self.tags.join(",")));
        }
        text
    }

    /// Whether `text` is exactly what sparsebak writes for this info: today's
    /// form, or version 1's from before the version line.
    pub fn is_written_form(&self, text: &str) -> bool {
        let now = self.to_text();
        text == now || now.strip_prefix(&format!("version={INFO_VERSION}\n")).is_some_and(|old| text == old)
    }

    pub fn parse(text: &str) -> Result<SessionInfo> {
        let mut kv = std::collections::HashMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line.split_once('=').ok_or_else(|| anyhow!("bad info line {line:?}"))?;
            kv.insert(k.trim(), v.trim());
        }
        let get = |k: &str| kv.get(k).copied().ok_or_else(|| anyhow!("info lacks {k:?}"));
        let num = |k: &str| -> Result<u64> { get(k)?.parse().with_context(|| format!("info {k:?}")) };
        let version = layout::declared_version(kv.get("version").copied()).context("info")?;
        layout::check_format_version(std::path::Path::new(layout::INFO_FILE), version, INFO_VERSION)?;
        let format = match get("format")? {
            "folders" => SessionFormat::Folders,
            "tar" => SessionFormat::Tar,
            other => bail!("unknown session format {other:?}"),
        };
        let previous = match get("previous")? {
            "none" => None,
            p => Some(SessionId::parse(p)?),
        };
        let chunk_size = num("chunksize")?;
        if !chunk_size.is_power_of_two() || chunk_size > sparsebak_proto::msg::MAX_CHUNK_SIZE {
            bail!("bad chunk size {chunk_size} in info");
        }
        let tags: Vec<String> = match kv.get("tags") {
            None => Vec::new(),
            Some(t) => t.split(',').map(str::to_string).collect(),
        };
        if tags.len() > MAX_TAGS {
            bail!("info has {} tags (at most {MAX_TAGS})", tags.len());
        }
        for t in &tags {
            validate_tag(t).context("info")?;
        }
        Ok(SessionInfo {
            format,
            chunk_size,
            volume_size: num("volsize")?,
            previous,
            chunks: num("chunks")?,
            bytes: num("bytes")?,
            zeros: num("zeros")?,
            tags,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn next_is_strictly_increasing() {
        let now = Utc.with_ymd_and_hms(2026, 11, 29, 8, 30, 0).single().expect("valid time");
        let first = SessionId::next(now, None).expect("name");
        assert_eq!(first.as_str(), "S_20261129-083000");
        let second = SessionId::next(now, Some(&first)).expect("name");
        assert_eq!(second.as_str(), "S_20261129-083001");
        let later = SessionId::next(now + TimeDelta::seconds(60), Some(&second)).expect("name");
        assert_eq!(later.as_str(), "S_20261129-083100");
        assert_eq!(later.date_time(), "20261129-083100");
        assert_eq!(later.rfc3339(), "2026-11-29T08:31:00Z");
    }

    #[test]
    fn user_forms() {
        assert_eq!(SessionId::from_user("20261129-083000").expect("ok").as_str(), "S_20261129-083000");
        assert!(SessionId::from_user("S_20261129-083000").is_ok());
        assert!(SessionId::from_user("20261399-083000").is_err());
        assert!(SessionId::from_user("yesterday").is_err());
    }

    #[test]
    fn info_round_trip() {
        let info = SessionInfo {
            format: SessionFormat::Folders,
            chunk_size: 131072,
            volume_size: 12345678,
            previous: Some(SessionId::parse("S_20261129-083000").expect("ok")),
            chunks: 3,
            bytes: 999,
            zeros: 7,
            tags: Vec::new(),
        };
        assert_eq!(SessionInfo::parse(&info.to_text()).expect("parses"), info);
        assert!(!info.to_text().contains("tags"), "no tags line without tags");
        let tagged = SessionInfo { tags: vec!["before-upgrade".into(), "v1.2".into()], ..info.clone() };
        assert!(tagged.to_text().ends_with("zeros=7\ntags=before-upgrade,v1.2\n"));
        assert_eq!(SessionInfo::parse(&tagged.to_text()).expect("parses"), tagged);
        assert!(SessionInfo::parse(&format!("{}tags=a b\n", info.to_text())).is_err());
        assert!(SessionInfo::parse(&format!("{}tags=\n", info.to_text())).is_err());
        for bad in ["", "a b", "x/y", "é", &"a".repeat(33)] {
            assert!(validate_tag(bad).is_err(), "{bad:?}");
        }
        let tar = SessionInfo { format: SessionFormat::Tar, ..info };
        assert_eq!(SessionInfo::parse(&tar.to_text()).expect("parses"), tar);
        assert!(SessionInfo::parse("format=folders\n").is_err());
    }

    #[test]
    fn info_versions() {
        let info = SessionInfo {
            format: SessionFormat::Folders,
            chunk_size: 65536,
            volume_size: 1,
            previous: None,
            chunks: 1,
            bytes: 1,
            zeros: 0,
            tags: Vec::new(),
        };
        let text = info.to_text();
        assert!(text.starts_with("version=1\n"), "{text}");
        // Written before versions existed: no version line means version 1.
        let old = text.replace("version=1\n", "");
        assert_eq!(SessionInfo::parse(&old).expect("versionless parses"), info);
        let err = SessionInfo::parse(&text.replace("version=1", "version=3")).expect_err("newer refused").to_string();
        assert!(err.contains("info") && err.contains("format version 3") && err.contains("(version 1)"), "{err}");
        assert!(info.is_written_form(&text) && info.is_written_form(&old));
        assert!(!info.is_written_form(&format!("{text}zeros=0\n")), "a repeated key");
        for bad in ["version=0", "version=+1", "version=01", "version=x"] {
            assert!(SessionInfo::parse(&text.replace("version=1", bad)).is_err(), "{bad}");
        }
    }
}
