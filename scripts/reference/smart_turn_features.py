#!/usr/bin/env python3
"""Smart Turn v3's input features, computed by pipecat's own extractor.

Prepares a 16 kHz mono WAV as pipecat's LocalSmartTurnAnalyzerV3 does (int16
/ 32768, the last 8 s kept, shorter audio zero-padded at the front), runs
pipecat's vendored `compute_whisper_log_mel_features` on it and writes the
[80][800] features as little-endian float32, row-major, for the turn-end
model's test. With MODEL.onnx and the onnxruntime package importable, it also
prints the model's end-of-turn probability for the same audio.

    usage: smart_turn_features.py AUDIO.wav WHISPER_FEATURES.py OUT.f32 [MODEL.onnx]

WHISPER_FEATURES.py is pipecat/audio/turn/smart_turn/_whisper_features.py
from the pipecat-ai 1.14.0 wheel on PyPI
(`pip download --no-deps pipecat-ai==1.14.0`); it needs only NumPy.
"""
import importlib.util
import sys
import wave

import numpy as np

RATE, SECONDS = 16000, 8


def last_8_seconds(audio):
    # local_smart_turn_v3.py: truncate_audio_to_last_n_seconds
    keep = SECONDS * RATE
    if len(audio) > keep:
        return audio[-keep:]
    return np.pad(audio, (keep - len(audio), 0), mode="constant", constant_values=0)


def main():
    path, extractor_path, out = sys.argv[1:4]
    spec = importlib.util.spec_from_file_location("whisper_features", extractor_path)
    extractor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extractor)
    with wave.open(path) as w:
        assert w.getframerate() == RATE and w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    audio = last_8_seconds(pcm.astype(np.float32) / 32768.0)
    features = extractor.compute_whisper_log_mel_features(audio, do_normalize=True)
    assert features.shape == (80, 800), features.shape
    features.astype("<f4").tofile(out)
    print(f"{path}: {len(pcm)} samples; features min {features.min():.6f} max {features.max():.6f}")
    if len(sys.argv) > 4:
        import onnxruntime

        session = onnxruntime.InferenceSession(sys.argv[4])
        (logits,) = session.run(None, {"input_features": features[np.newaxis]})
        print(f"end-of-turn probability {logits[0].item():.6f}")


if __name__ == "__main__":
    main()
