#!/usr/bin/env python3
"""Reference next-token logits of the real default model (Gemma 3 270M Q4_K_M GGUF).

Token ids come from llama.cpp's tokenizer (llama-cpp-python, vocab only); logits come from
transformers loading the same GGUF file, dequantized to float32. Writes
fixtures/gemma3_270m/reference.json: for each prompt, its ids, the greedy next token, and the
top-10 (id, logit) pairs.

  /root/.venvs/llama/bin/python scripts/make_real_model_reference.py ids  MODEL.gguf   # step 1: ids
  /root/.venvs/ref/bin/python   scripts/make_real_model_reference.py logits MODEL.gguf # step 2: logits
(two venvs because llama-cpp-python and torch live apart; step 1 writes ids.json next to the output)
"""
import json
import os
import sys

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "gemma3_270m")
IDS = os.path.join(OUT_DIR, "ids.json")
REF = os.path.join(OUT_DIR, "reference.json")

# Longer than the 512-token sliding window, so the ring buffers wrap and global layers see
# positions the local ones no longer do. A counting sequence keeps the next token unambiguous.
LONG = "Counting aloud: " + ", ".join(str(i) for i in range(1, 331)) + ","

# A greedy comparison is only meaningful when the reference's top two logits are apart by more
# than the run-to-run spread of quantized engines (llama.cpp itself moves logits by ~0.6 here).
MIN_GREEDY_MARGIN = 0.5

PROMPTS = [
    "The capital of France is",
    "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "東京は日本の首都です。大阪は",
    "1, 1, 2, 3, 5, 8, 13, 21,",
    LONG,
]


def make_ids(model_path):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model_path, vocab_only=True, verbose=False)
    out = []
    for text in PROMPTS:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        out.append({"text": text, "ids": ids})
    assert len(out[-1]["ids"]) > 512, "the long prompt must exceed the 512-token sliding window"
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(IDS, "w") as f:
        json.dump({"generator": "scripts/make_real_model_reference.py ids", "llama_cpp": llama_cpp.__version__, "prompts": out}, f, ensure_ascii=False, indent=1)


def make_logits(model_path):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    with open(IDS) as f:
        prompts = json.load(f)["prompts"]
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(model_path)), gguf_file=os.path.basename(model_path), dtype=torch.float32
    ).eval()
    cases = []
    with torch.no_grad():
        for p in prompts:
            logits = model(torch.tensor([p["ids"]])).logits[0, -1].float()
            top = torch.topk(logits, 10)
            margin = float(top.values[0] - top.values[1])
            assert margin >= MIN_GREEDY_MARGIN, f"prompt {p['text'][:40]!r}: top-2 margin {margin:.3f} is a coin flip"
            cases.append({
                "text": p["text"],
                "ids": p["ids"],
                "greedy": int(logits.argmax()),
                "top": [[int(i), float(v)] for v, i in zip(top.values, top.indices)],
            })
    with open(REF, "w") as f:
        json.dump({
            "generator": "scripts/make_real_model_reference.py logits",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "model_sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "cases": cases,
        }, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    step, path = sys.argv[1], sys.argv[2]
    {"ids": make_ids, "logits": make_logits}[step](path)
