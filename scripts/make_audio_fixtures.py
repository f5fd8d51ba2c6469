#!/usr/bin/env python3
"""Test audio clips and Gemma 3n log-mel references, from transformers 5.24.

Writes fixtures/audio/:
  <name>.<ext>            synthetic clips made here (seeded): speech-like (a harmonic voice with a
                          moving pitch, formant resonances and syllable envelopes, fricative noise
                          bursts, a little background noise), silence, hard clipping; WAV at 16 kHz
                          mono, 8 kHz mono and 44.1 kHz stereo, FLAC (22.05 kHz, 24-bit), MP3 and
                          OGG/Vorbis (through ffmpeg: libmp3lame, libvorbis)
  ref/<name>.features.f32.bin
                          Gemma3nAudioFeatureExtractor()(signal)["input_features"][0]: [frames, 128]
  ref/<name>.mask.u8.bin  ...["input_features_mask"][0] as bytes 0/1: [frames]
  ref/<name>.signal16k.f32.bin
                          the reference's 16 kHz mono signal for a clip that is not 16 kHz mono
  reference.json          index: every clip with its format, rate, channels, frames, and its
                          reference files and shapes; the reference's settings and findings
All .bin files are little-endian, C order.

Also writes crates/media/src/mel_window.rs: the extractor's float32 Hann window, bit for bit. numpy
computes it in float32 with its own SIMD cos, which differs from a correctly rounded cos by one ulp
at 37 of the 512 points; the window's far side lobes carry those ulps into the nearly empty mel
bands (up to 5e-3 on upsampled 8 kHz audio), so the Rust side uses numpy's values.

THE REFERENCE. transformers' own loading path for an audio file, `transformers.audio_utils.load_audio`
(what `processor.apply_chat_template` does with {"type": "audio", "path": ...}), with
backend="soundfile" (its fallback when torchcodec is not installed, and not installed here):
soundfile (libsndfile) decodes to float32, channels are averaged (float32 mean), and a rate other
than 16 kHz is resampled with soxr, quality "soxr_hq", then padded/trimmed to
ceil(n * 16000 / rate) samples (audio_utils.py `_load_audio_soundfile`). That signal is what the
feature extractor gets; for clips that are not 16 kHz it is stored as signal16k so that our
resampler can be compared with it and our features computed on the same input.

The feature extractor itself is called with its defaults, as Gemma3nProcessor calls it (the processor
sets no audio kwargs): padding="longest", max_length=480000, truncation=True, pad_to_multiple_of=128.
It has no sampling-rate check: `sampling_rate=` lands in **kwargs and is ignored, so audio at another
rate is silently treated as 16 kHz.

`float64_max_abs_diff` in reference.json says, per clip, how far the reference's features are from
the same computation done in float64 throughout: the reference's pre-emphasis, window and FFT run in
float32 (numpy >= 2 keeps float32 with Python-float scalars), and the float32 pre-emphasis
(x[i] - 0.97 x[i-1], which cancels) and window matter: up to 2e-4, 1.5e-2 in empty bands. The Rust
side reproduces the float32 pre-emphasis and window exactly (FFT in float64: the reference's
float32 FFT rounding is below 1e-6 in the features).

Run with the dev venv (scripts/dev-venv.sh: soundfile, soxr pinned there), then
  ~/.venvs/ref/bin/python scripts/make_audio_fixtures.py
ffmpeg (with libmp3lame and libvorbis) must be on PATH for the MP3 and OGG clips.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import soundfile as sf
import soxr
import transformers
from transformers import Gemma3nAudioFeatureExtractor
from transformers.audio_utils import load_audio

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "audio")
REF = os.path.join(ROOT, "ref")


def voice(rate, seconds, seed, f0_lo=95.0, f0_hi=210.0):
    """A speech-like signal: harmonics of a gliding pitch shaped by three moving formants, cut into
    syllables, with fricative noise bursts between them and a little background noise."""
    rng = np.random.default_rng(seed)
    n = int(round(rate * seconds))
    t = np.arange(n) / rate
    f0 = f0_lo + (f0_hi - f0_lo) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    formants = [(600 + 250 * np.sin(2 * np.pi * 1.3 * t), 90.0),
                (1500 + 500 * np.sin(2 * np.pi * 0.9 * t + 1.0), 120.0),
                (2600 + 300 * np.sin(2 * np.pi * 0.5 * t + 2.0), 180.0)]
    x = np.zeros(n)
    for k in range(1, 60):
        fk = k * f0
        if fk.min() > min(rate / 2 - 200, 7800):
            break
        gain = sum(1.0 / (1.0 + ((fk - fc) / bw) ** 2) for fc, bw in formants)
        gain = gain * (fk < rate / 2 - 100)
        x += gain * np.sin(k * phase) / k ** 0.5
    # Syllables: ~4 per second, raised-cosine envelopes with gaps.
    env = np.clip(np.sin(2 * np.pi * 2.1 * t + rng.uniform(0, 6)), 0, None) ** 0.7
    x *= env
    # Fricatives in the gaps: band-passed noise (2-6 kHz, below Nyquist).
    noise = rng.standard_normal(n)
    spec = np.fft.rfft(noise)
    f = np.fft.rfftfreq(n, 1 / rate)
    spec *= ((f > 2000) & (f < min(6000, rate / 2 - 500)))
    fric = np.fft.irfft(spec, n)
    fric *= (1 - env) ** 4 * (np.sin(2 * np.pi * 1.1 * t) > 0.2)
    x = x / np.max(np.abs(x)) * 0.5 + fric / (np.max(np.abs(fric)) + 1e-12) * 0.15
    x += 0.003 * rng.standard_normal(n)
    return x


def write_wav(path, x, rate, subtype="PCM_16"):
    sf.write(path, x, rate, subtype=subtype, format="WAV")


def ffmpeg(src, dst, *args):
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", src, *args, dst], check=True)


def features_f64(fe, x):
    """The extractor's computation in float64 throughout (for the float32 noise floor)."""
    x = np.asarray(x, dtype=np.float64)
    n = min(len(x), 480000)
    x = x[:n]
    n_pad = -(-n // 128) * 128
    x = np.pad(x, (0, n_pad - n))
    frames = (n_pad - 513) // 160 + 1
    out = np.zeros((max(frames, 0), 128))
    win = 0.5 * (1 - np.cos(2 * np.pi * np.arange(512) / 512))
    for i in range(max(frames, 0)):
        fr = x[i * 160:i * 160 + 513]
        y = np.concatenate([fr[:1] * (1 - 0.97), fr[1:-1] - 0.97 * fr[:-2]]) * win
        mag = np.abs(np.fft.rfft(y, n=1024))
        out[i] = np.log(np.maximum(mag @ fe.mel_filters, 1e-5))
    return out


def write_window(window):
    assert window.dtype == np.float32 and window.shape == (512,)
    bits = window.view(np.uint32)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "media", "src",
                        "mel_window.rs")
    lines = ["//! Written by scripts/make_audio_fixtures.py: `Gemma3nAudioFeatureExtractor().window`",
             f"//! (transformers {transformers.__version__}, numpy {np.__version__}) as f32 bit patterns. See",
             "//! `crate::mel` for why the bits matter.", "",
             "pub(crate) const HANN_512_BITS: [u32; 512] = ["]
    for i in range(0, 512, 8):
        lines.append("    " + " ".join(f"0x{b:08x}," for b in bits[i:i + 8]))
    lines.append("];")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main():
    if shutil.which("ffmpeg") is None:
        sys.exit("ffmpeg is needed for the MP3 and OGG clips")
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(REF)
    fe = Gemma3nAudioFeatureExtractor()
    clips = []

    def add(name, fmt, path, rate, channels, frames, signal16k, note, store_signal):
        feats = fe(signal16k)
        f = feats["input_features"][0]
        m = feats["input_features_mask"][0]
        assert f.dtype == np.float32 and m.dtype == np.bool_
        entry = {
            "name": name, "file": os.path.basename(path), "format": fmt, "sample_rate": rate,
            "channels": channels, "frames": frames, "seconds": frames / rate, "note": note,
            "signal16k_len": len(signal16k),
            "features": f"ref/{name}.features.f32.bin", "features_shape": list(f.shape),
            "mask": f"ref/{name}.mask.u8.bin", "mask_shape": list(m.shape),
            "mask_true": int(m.sum()),
            "float64_max_abs_diff": float(np.abs(features_f64(fe, signal16k) - f).max()) if len(f) else 0.0,
        }
        f.astype("<f4").tofile(os.path.join(REF, f"{name}.features.f32.bin"))
        m.astype(np.uint8).tofile(os.path.join(REF, f"{name}.mask.u8.bin"))
        if store_signal:
            entry["signal16k"] = f"ref/{name}.signal16k.f32.bin"
            np.asarray(signal16k, dtype="<f4").tofile(os.path.join(REF, f"{name}.signal16k.f32.bin"))
        clips.append(entry)

    def load16k(path):
        return load_audio(path, sampling_rate=16000, backend="soundfile")

    # 16 kHz mono WAV, a length that is not a multiple of 128 (padding exercised).
    x = voice(16000, 32123 / 16000, seed=1)
    p = os.path.join(ROOT, "speech_16k_mono.wav")
    write_wav(p, x, 16000)
    s = load16k(p)
    assert len(s) == 32123
    add("speech_16k_mono", "wav", p, 16000, 1, len(s), s,
        "16-bit PCM; features on the decoded samples (no resampling)", False)

    # Silence.
    p = os.path.join(ROOT, "silence_16k_mono.wav")
    write_wav(p, np.zeros(16000), 16000)
    add("silence_16k_mono", "wav", p, 16000, 1, 16000, load16k(p), "all zeros: every feature is ln(1e-5)", False)

    # Hard clipping: a loud voice, clipped at full scale.
    x = np.clip(voice(16000, 1.0, seed=2) * 4.0, -1.0, 1.0)
    p = os.path.join(ROOT, "clipping_16k_mono.wav")
    write_wav(p, x, 16000)
    s = load16k(p)
    assert np.abs(s).max() >= 32767 / 32768
    add("clipping_16k_mono", "wav", p, 16000, 1, len(s), s, "clipped at full scale", False)

    # 8 kHz mono.
    x = voice(8000, 1.5, seed=3)
    p = os.path.join(ROOT, "speech_8k_mono.wav")
    write_wav(p, x, 8000)
    add("speech_8k_mono", "wav", p, 8000, 1, len(x), load16k(p), "resampled 8k -> 16k by soxr_hq", True)

    # 44.1 kHz stereo: two different channels, so the down-mix matters.
    left = voice(44100, 1.2, seed=4)
    right = 0.6 * voice(44100, 1.2, seed=5, f0_lo=160, f0_hi=300)
    p = os.path.join(ROOT, "speech_44k1_stereo.wav")
    write_wav(p, np.stack([left, right], axis=1), 44100)
    add("speech_44k1_stereo", "wav", p, 44100, 2, len(left), load16k(p),
        "mean of the two channels, then 44.1k -> 16k by soxr_hq", True)

    # FLAC: 22.05 kHz mono, 24-bit.
    x = voice(22050, 1.5, seed=6)
    p = os.path.join(ROOT, "speech_22k05_mono_24bit.flac")
    sf.write(p, x, 22050, subtype="PCM_24", format="FLAC")
    add("speech_22k05_mono_24bit", "flac", p, 22050, 1, len(x), load16k(p),
        "24-bit FLAC, 22.05k -> 16k by soxr_hq", True)

    # MP3 and OGG/Vorbis through ffmpeg from a 16-bit WAV made here (not committed).
    tmp = os.path.join(REF, "_tmp.wav")
    write_wav(tmp, voice(24000, 1.0, seed=7), 24000)
    p = os.path.join(ROOT, "speech_24k_mono.mp3")
    ffmpeg(tmp, p, "-c:a", "libmp3lame", "-b:a", "48k", "-map_metadata", "-1")
    info = sf.info(p)
    s = load16k(p)
    add("speech_24k_mono_mp3", "mp3", p, info.samplerate, info.channels, info.frames, s,
        "lossy; libsndfile (mpg123) decode, then soxr_hq: decoders differ, compare loosely", True)
    write_wav(tmp, np.stack([voice(48000, 1.0, seed=8), voice(48000, 1.0, seed=9)], axis=1), 48000)
    p = os.path.join(ROOT, "speech_48k_stereo.ogg")
    ffmpeg(tmp, p, "-c:a", "libvorbis", "-q:a", "2", "-map_metadata", "-1")
    info = sf.info(p)
    s = load16k(p)
    add("speech_48k_stereo_ogg", "ogg", p, info.samplerate, info.channels, info.frames, s,
        "lossy; libsndfile (libvorbis) decode, then soxr_hq: decoders differ, compare loosely", True)
    os.remove(tmp)

    write_window(fe.window)

    index = {
        "generator": "scripts/make_audio_fixtures.py",
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "soundfile": sf.__version__,
        "libsndfile": sf.__libsndfile_version__,
        "soxr": soxr.__version__,
        "feature_extractor": {
            "class": "Gemma3nAudioFeatureExtractor", "sampling_rate": fe.sampling_rate,
            "frame_length": fe.frame_length, "hop_length": fe.hop_length, "fft_length": fe.fft_length,
            "feature_size": fe.feature_size, "min_frequency": fe.min_frequency,
            "max_frequency": fe.max_frequency, "preemphasis": fe.preemphasis,
            "preemphasis_htk_flavor": fe.preemphasis_htk_flavor, "mel_floor": float(fe.mel_floor),
            "call_defaults": {"padding": "longest", "max_length": 480000, "truncation": True,
                              "pad_to_multiple_of": 128},
        },
        "signal16k_route": "transformers.audio_utils.load_audio(path, sampling_rate=16000, backend='soundfile')",
        "binary_format": "little-endian, C order; features float32 [frames, 128]; mask uint8 0/1; signal16k float32",
        "clips": clips,
    }
    with open(os.path.join(ROOT, "reference.json"), "w") as fh:
        json.dump(index, fh, indent=1)
        fh.write("\n")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
    print(f"wrote {len(clips)} clips to {ROOT}: {total / 1024:.0f} KiB")
    for c in clips:
        print(f"  {c['name']}: {c['sample_rate']} Hz x{c['channels']} {c['frames']} frames, "
              f"features {c['features_shape']}, f64 diff {c['float64_max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
