#!/usr/bin/env python3
"""Whisper's reference log-mel features (openai/whisper audio.py, in NumPy).

Writes the first FRAMES frames of the features of a 16 kHz mono WAV as
little-endian float32, row-major [80][FRAMES], for the extractor's test.

    usage: whisper_mel.py AUDIO.wav MEL_FILTERS.npz OUT.f32 [FRAMES]

MEL_FILTERS.npz is whisper/assets/mel_filters.npz from the openai-whisper
package on PyPI (`pip download --no-deps --no-binary :all: openai-whisper`).
"""
import sys
import wave

import numpy as np

N_FFT, HOP, N_SAMPLES, N_FRAMES = 400, 160, 480000, 3000


def log_mel_spectrogram(audio, filters):
    # transcribe.py: log_mel_spectrogram(audio, padding=N_SAMPLES)
    audio = np.pad(audio, (0, N_SAMPLES))
    # torch.stft(center=True): reflect padding of N_FFT // 2 on both sides.
    padded = np.pad(audio, (N_FFT // 2, N_FFT // 2), mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # torch.hann_window
    count = 1 + (len(padded) - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(count, N_FFT), strides=(padded.strides[0] * HOP, padded.strides[0])
    )
    stft = np.fft.rfft(frames * window, axis=1).T  # [201, count]
    magnitudes = np.abs(stft[:, :-1]) ** 2
    mel_spec = filters @ magnitudes
    log_spec = np.log10(np.maximum(mel_spec, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    return log_spec[:, :N_FRAMES]  # pad_or_trim(mel, N_FRAMES)


def main():
    path, filters_path, out = sys.argv[1:4]
    keep = int(sys.argv[4]) if len(sys.argv) > 4 else N_FRAMES
    with wave.open(path) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    audio = pcm.astype(np.float64) / 32768.0
    filters = np.load(filters_path)["mel_80"].astype(np.float64)
    features = log_mel_spectrogram(audio, filters)
    features[:, :keep].astype("<f4").tofile(out)
    print(f"{path}: {features.shape[1]} frames, kept {keep}; padding value {features[0, -1]:.6f}")


if __name__ == "__main__":
    main()
