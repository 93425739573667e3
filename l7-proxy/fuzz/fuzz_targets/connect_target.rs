//! The CONNECT authority / `sluice-target` parser: never panics, and what it
//! accepts prints back to the same address.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| l7_proxy::target::fuzz_parse_target(data));
