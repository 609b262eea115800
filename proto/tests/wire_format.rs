//! The wire format, pinned: every message kind has a golden frame in
//! `tests/fixtures/`, made from the samples in `support/wire_samples.rs`.
//! A message's kind is its position in its enum (bincode numbers variants
//! in order), so adding, removing, reordering or reshaping a message makes
//! these tests fail. That is a protocol change: bump `PROTOCOL_VERSION`,
//! then regenerate the fixtures on purpose with
//! `cargo run -p sparsebak-proto --example gen_wire_fixtures`.

#[path = "support/wire_samples.rs"]
mod wire_samples;

use serde::{de::DeserializeOwned, Serialize};
use sparsebak_proto::frame::{decode_payload, encode_frame};
use sparsebak_proto::{read_msg, Request, Response, PROTOCOL_VERSION};
use std::fmt::Debug;
use wire_samples::{fixtures_dir, request_fixture, response_fixture, VERSION_FILE};

const REGENERATE: &str = "if the change is meant, bump PROTOCOL_VERSION and run \
                          `cargo run -p sparsebak-proto --example gen_wire_fixtures`";

/// The fixture decodes to exactly `sample` and re-encodes to the same bytes.
fn check_fixture<T: Serialize + DeserializeOwned + PartialEq + Debug>(name: &str, sample: &T) {
    let path = fixtures_dir().join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}; {REGENERATE}", path.display()));
    let mut rd = &bytes[..];
    let decoded: T = match read_msg(&mut rd) {
        Ok(Some(msg)) => msg,
        other => panic!("{name} no longer decodes ({other:?}): the wire format changed; {REGENERATE}"),
    };
    assert!(rd.is_empty(), "{name}: {} bytes after the frame", rd.len());
    assert_eq!(&decoded, sample, "{name} decodes to another value: the wire format changed; {REGENERATE}");
    let again = encode_frame(&decoded).expect("re-encodes");
    assert_eq!(again, bytes, "{name} re-encodes differently: the wire format changed; {REGENERATE}");
}

#[test]
fn every_request_fixture_decodes_to_its_sample_and_back() {
    for req in wire_samples::requests() {
        check_fixture(request_fixture(&req), &req);
    }
}

#[test]
fn every_response_fixture_decodes_to_its_sample_and_back() {
    for resp in wire_samples::responses() {
        check_fixture(response_fixture(&resp), &resp);
    }
}

/// One value of every kind of `T` as the wire numbers them: kind `i` is a
/// payload starting with byte `i`, and zero bytes after it decode as the
/// zero value of every field type the messages use (0, "", empty vector,
/// None, the first variant). The first kind nothing decodes for ends the
/// list.
fn every_kind<T: DeserializeOwned>() -> Vec<T> {
    let mut kinds = Vec::new();
    for kind in 0..=250u8 {
        let found = (0..64).find_map(|zeros| {
            let mut payload = vec![kind];
            payload.resize(1 + zeros, 0);
            decode_payload::<T>(&payload).ok()
        });
        match found {
            Some(msg) => kinds.push(msg),
            None => break,
        }
    }
    kinds
}

/// Every kind has a sample, in wire order. With the wildcard-free matches
/// of `request_fixture`/`response_fixture`, a new message cannot slip in
/// without a fixture: it does not compile until it is named, and fails here
/// until it has a sample.
#[test]
fn every_message_kind_has_a_sample_and_a_fixture() {
    let kinds: Vec<&str> = every_kind::<Request>().iter().map(request_fixture).collect();
    let samples: Vec<&str> = wire_samples::requests().iter().map(request_fixture).collect();
    assert_eq!(samples, kinds, "one request sample per kind, in wire order");
    let kinds: Vec<&str> = every_kind::<Response>().iter().map(response_fixture).collect();
    let samples: Vec<&str> = wire_samples::responses().iter().map(response_fixture).collect();
    assert_eq!(samples, kinds, "one response sample per kind, in wire order");

    let mut on_disk: Vec<String> = std::fs::read_dir(fixtures_dir())
        .expect("fixtures folder")
        .map(|e| e.expect("fixtures entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".bin"))
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = wire_samples::frames().into_iter().map(|(name, _)| name.to_string()).collect();
    expected.sort();
    assert_eq!(on_disk, expected, "fixtures on disk and samples differ; {REGENERATE}");
}

#[test]
fn fixtures_were_made_for_this_protocol_version() {
    let path = fixtures_dir().join(VERSION_FILE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(text.trim(), PROTOCOL_VERSION.to_string(), "{}: PROTOCOL_VERSION changed; {REGENERATE}", path.display());
}
