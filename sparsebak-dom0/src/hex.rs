//! Lowercase hex for hashes in manifests and keys in key files: one codec,
//! strict on input (ASCII hex digits only, even length).

use anyhow::{bail, Result};

pub fn encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn decode(s: &str) -> Result<Vec<u8>> {
    if s.len() % 2 == 1 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        bail!("bad hex string");
    }
    // All ASCII, so byte offsets are char boundaries.
    (0..s.len()).step_by(2).map(|i| Ok(u8::from_str_radix(&s[i..i + 2], 16)?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strictness() {
        assert_eq!(encode(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(decode("00abFF").expect("hex"), vec![0, 0xab, 0xff]);
        for bad in ["0", "+a", "zz", "é0", "0 "] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
    }
}
