#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = diskferry::journal::Journal::decode(data);
});
