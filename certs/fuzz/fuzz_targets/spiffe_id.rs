//! From certs/fuzz: `cargo +nightly fuzz run spiffe_id corpus/spiffe_id corpus-seed/spiffe_id`
//! (new inputs go to the first, git-ignored, directory).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| certs::fuzzing::spiffe_id(data));
