#!/usr/bin/env python3
"""How much a base (pretrained) model loops under each sampling setting: the measurement
behind `gemma run`'s defaults for base models (outside CI; stdlib only).

For every setting, each completion-style prompt is continued with `gemma run` for
--tokens tokens under --seeds seeds. Over the words of each continuation it computes:
  - repetition: the share of word 4-grams that already occurred earlier in the same text
    (0 = never repeats itself; a loop drives it towards 1);
  - distinct-2: distinct word bigrams / all bigrams (higher = more varied);
  - looped: the share of continuations whose last third repeats 4-grams at least half the time.
Prints one table (mean over prompts and seeds) with the CPU's instruction sets.

Usage: base_sampling.py [--binary target/release/gemma] [--model PATH] [--tokens 128] [--seeds 2]
"""

import argparse
import os
import subprocess
import sys

PROMPTS = [
    "The three most surprising facts about octopuses are",
    "Once upon a time, in a small village by the sea,",
    "The best way to learn a new programming language is",
    "Photosynthesis is the process by which",
    "My favourite recipe for a rainy day is",
    "The history of the bicycle begins in",
    "Here is a short guide to keeping houseplants alive:",
    "The city of Lisbon is known for",
    "When the train finally arrived, she",
    "A good night's sleep matters because",
    "The rules of chess are simple:",
    "In 1969, the first humans to walk on the Moon",
]

# name -> flags for `gemma run` (with `--raw`, unless the flags say `--chat` or `--auto`).
SETTINGS = {
    # What `gemma run PROMPT` did before base models were detected: the chat template around
    # the prompt, the chat defaults.
    "before: chat template, chat defaults": ["--chat"],
    # What `gemma run PROMPT` does now with a base model (no flags: its base defaults).
    "now: `gemma run` on a base model (its defaults)": ["--auto"],
    "greedy": ["--temp", "0"],
    "chat defaults (temp 1, top-k 64, top-p 0.95)": ["--temp", "1", "--top-k", "64", "--top-p", "0.95"],
    "temp 0.7, top-k 40, top-p 0.9, min-p 0.05": ["--temp", "0.7", "--top-k", "40", "--top-p", "0.9", "--min-p", "0.05"],
    "temp 0.8, top-k 40, top-p 0.95, min-p 0.05, rep 1.1": [
        "--temp", "0.8", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.05", "--repeat-penalty", "1.1"],
    "temp 0.7, top-k 40, top-p 0.95, min-p 0.05, rep 1.15": [
        "--temp", "0.7", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.05", "--repeat-penalty", "1.15"],
    "temp 0.7, top-k 40, top-p 0.95, min-p 0.05, rep 1.1, presence 0.3": [
        "--temp", "0.7", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.05", "--repeat-penalty", "1.1",
        "--presence-penalty", "0.3"],
}


def ngrams(words, n):
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def repetition(words):
    grams = ngrams(words, 4)
    if not grams:
        return 0.0
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def distinct2(words):
    grams = ngrams(words, 2)
    return len(set(grams)) / len(grams) if grams else 1.0


def looped(words):
    grams = ngrams(words, 4)
    if len(grams) < 12:
        return False
    cut = 2 * len(grams) // 3
    earlier = set(grams[:cut])
    tail = grams[cut:]
    seen, repeats = set(earlier), 0
    for g in tail:
        repeats += g in seen
        seen.add(g)
    return repeats / len(tail) >= 0.5


def isa():
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"] if f in flags)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="target/release/gemma")
    ap.add_argument("--model")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--only", help="run only the settings whose name contains this")
    args = ap.parse_args()
    base = [args.binary, "-q"] + (["--model", args.model] if args.model else [])
    print(f"{len(PROMPTS)} prompts x {args.seeds} seeds, {args.tokens} tokens each, `gemma run`; "
          f"CPU [{isa()}]")
    print(f"| setting | repetition (4-grams) | distinct-2 | looped |\n| --- | --- | --- | --- |")
    for name, flags in SETTINGS.items():
        if args.only and args.only not in name:
            continue
        reps, d2s, loops, n = 0.0, 0.0, 0, 0
        mode = [] if flags[:1] in (["--chat"], ["--auto"]) else ["--raw"]
        flags = [f for f in flags if f != "--auto"]
        seeds = [0] if flags[:2] == ["--temp", "0"] else range(args.seeds)
        for prompt in PROMPTS:
            for seed in seeds:
                cmd = base + ["run"] + mode + ["-n", str(args.tokens), "--seed", str(seed)] + flags + [prompt]
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                if out.returncode != 0:
                    sys.exit(f"{' '.join(cmd)} failed: {out.stderr[-500:]}")
                words = out.stdout.split()
                reps += repetition(words)
                d2s += distinct2(words)
                loops += looped(words)
                n += 1
        print(f"| {name} | {reps / n:.3f} | {d2s / n:.3f} | {loops}/{n} |", flush=True)


if __name__ == "__main__":
    main()
