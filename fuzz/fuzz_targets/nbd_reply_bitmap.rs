#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| diskferry_fuzz::nbd_reply_bitmap(data));
