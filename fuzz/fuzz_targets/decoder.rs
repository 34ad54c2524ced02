#![no_main]
//! The whole streaming decoder: the first byte picks the declared format and
//! the piece size, the rest is the stream.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    sonora::audio::fuzzing::decode(rest, selector);
});
