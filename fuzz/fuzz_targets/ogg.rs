#![no_main]
//! The Ogg demuxer alone, fed in pieces whose size the input chooses.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    sonora::audio::fuzzing::demux_ogg(rest, usize::from(split) + 1);
});
