//! A workload's HTTP/1.1 response, as the proxy's client reads it: never
//! panics, stays within its bounds, and decodes the same whether the bytes
//! arrive at once or piece by piece.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| l7_proxy::h1client::fuzz_response(data));
