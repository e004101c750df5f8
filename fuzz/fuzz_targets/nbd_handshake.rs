//! libFuzzer entry point; the target itself is [`diskferry_fuzz::nbd_handshake`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| diskferry_fuzz::nbd_handshake(data));
