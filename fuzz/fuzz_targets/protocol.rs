#![no_main]
//! Sequences of client text and binary frames through a real conversation
//! and the scripted engine: it must always end with exactly one `Closed`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sonora::server::fuzzing::frames(data);
});
