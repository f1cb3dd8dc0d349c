//! The sidecar's HTTP/1.1 head parsers and chunked body relay on arbitrary bytes: see
//! [`usher_fuzz::http1_message`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| usher_fuzz::http1_message(data));
