//! A captured caller's HTTP/1.1 requests, as the proxy's server reads them
//! and answers: never panics, and writes nothing but HTTP/1.1 answers,
//! whatever the bytes and however they are split.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| l7_proxy::h1server::fuzz_requests(data));
