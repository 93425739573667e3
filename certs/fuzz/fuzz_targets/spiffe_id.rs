//! `cargo +nightly fuzz run spiffe_id corpus-seed/spiffe_id` (from certs/fuzz).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| certs::fuzzing::spiffe_id(data));
