//! Writes the golden wire-format fixtures (`proto/tests/fixtures/`) from the
//! samples in `proto/tests/support/wire_samples.rs`:
//! `cargo run -p sparsebak-proto --example gen_wire_fixtures`.
//!
//! The fixtures pin the protocol, so this refuses to change them while
//! `PROTOCOL_VERSION` is still the version they were made for: a changed
//! frame means the protocol changed, and the version must say so first.

#[path = "../tests/support/wire_samples.rs"]
mod wire_samples;

use anyhow::{bail, Context, Result};
use sparsebak_proto::PROTOCOL_VERSION;

fn main() -> Result<()> {
    let dir = wire_samples::fixtures_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let version_file = dir.join(wire_samples::VERSION_FILE);
    let made_for = std::fs::read_to_string(&version_file).ok().map(|v| v.trim().to_string());
    let frames = wire_samples::frames();

    let changed: Vec<&str> = frames
        .iter()
        .filter(|(name, bytes)| std::fs::read(dir.join(name)).ok().as_ref() != Some(bytes))
        .map(|(name, _)| *name)
        .collect();
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = entry.with_context(|| format!("listing {}", dir.display()))?.file_name();
        let name = name.to_string_lossy().into_owned();
        if name.ends_with(".bin") && !frames.iter().any(|(n, _)| *n == name) {
            stale.push(name);
        }
    }

    let current = PROTOCOL_VERSION.to_string();
    if changed.is_empty() && stale.is_empty() && made_for.as_deref() == Some(current.as_str()) {
        println!("fixtures in {} are up to date (protocol {current})", dir.display());
        return Ok(());
    }
    if made_for.as_deref() == Some(current.as_str()) {
        bail!(
            "the wire format changed (new or different: {changed:?}; gone: {stale:?}) but PROTOCOL_VERSION is \
             still {current}, the version the fixtures were made for: bump it in proto/src/msg.rs first"
        );
    }
    for (name, bytes) in &frames {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    for name in &stale {
        let path = dir.join(name);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    std::fs::write(&version_file, format!("{current}\n"))
        .with_context(|| format!("writing {}", version_file.display()))?;
    println!("wrote {} fixtures for protocol {current} in {}", frames.len(), dir.display());
    Ok(())
}
