//! libFuzzer entry point; the target itself is [`diskferry_fuzz::wire_frame`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| diskferry_fuzz::wire_frame(data));
