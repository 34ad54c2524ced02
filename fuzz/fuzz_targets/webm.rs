#![no_main]
//! The WebM demuxer alone, fed in pieces whose size the input chooses.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    sonora::audio::fuzzing::demux_webm(rest, usize::from(split) + 1);
});
