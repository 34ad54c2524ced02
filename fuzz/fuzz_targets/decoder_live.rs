#![no_main]
//! A live decoder (2× real time after a 10 s burst) over arbitrary bytes:
//! decoded audio must never outrun the wall clock by more than the burst.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&selector, rest)) = data.split_first() {
        sonora::audio::fuzzing::decode_live(rest, selector);
    }
});
