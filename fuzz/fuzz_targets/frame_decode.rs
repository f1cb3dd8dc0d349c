//! The shared frame codec's decode path on arbitrary bytes: see [`usher_fuzz::frame_decode`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| usher_fuzz::frame_decode(data));
