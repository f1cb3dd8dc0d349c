//! Arbitrary bytes as the frames the directory receives, through its checks and in-memory
//! state: see [`usher_fuzz::directory_message`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| usher_fuzz::directory_message(data));
