//! Protocol detection on the first bytes of a captured connection: never
//! panics, and decides every prefix the way it decides the whole input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| l7_proxy::sniff::fuzz_detect(data));
