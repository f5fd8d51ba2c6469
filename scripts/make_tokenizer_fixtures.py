#!/usr/bin/env python3
"""Writes fixtures/tokenizer/: reference tokenizations and chat-template renders.

Three parts, each needing a different dev venv; run from the repository root:

    /root/.venvs/llama/bin/python scripts/make_tokenizer_fixtures.py llama
    /root/.venvs/ref/bin/python   scripts/make_tokenizer_fixtures.py chat hf

llama: `llama_cpp_ids.json` — llama.cpp's ids (llama-cpp-python, `vocab_only=True`) for the real
       default model (Gemma 3 270M GGUF) and varied strings, with and without special-token parsing,
       plus `llama_detokenize` of those ids with special tokens rendered and hidden (hex bytes).
chat:  `gemma3_chat_template.jinja` — Gemma 3's official chat template (from the google/gemma-3-*-it
       tokenizer_config.json) — and `gemma3_chat_renders.json`: what transformers' own Jinja
       rendering (`render_jinja_template`, Jinja2 with trim_blocks/lstrip_blocks) makes of it for
       several conversations, or that it raises.
hf:    `tiny_tokenizer.json` — a small SentencePiece-style BPE `tokenizer.json` (byte fallback, `▁`,
       special tokens, BOS post-processor) trained with the `tokenizers` package — and
       `tiny_tokenizer_ids.json`: its encodings by the Python `tokenizers` package.
"""

import json
import os
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "tokenizer"
MODEL = Path(os.environ.get("GEMMA_CACHE_DIR", Path.home() / ".cache" / "gemma-rs")) / "models" / "gemma-3-270m-q4_k_m.gguf"

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple    spaces   between\twords",
    "中文分词测试：我们今天去公园散步。",
    "日本語のテキストとカタカナ、ひらがな。東京タワー",
    "مرحبا بالعالم، كيف حالك؟",
    "Русский текст и ελληνικά γράμματα",
    "हिन्दी भाषा और 한국어 텍스트",
    "Emoji: 😀👍🏽🎉",
    "ZWJ family: 👨\u200d👩\u200d👧\u200d👦 and 🏳\ufe0f\u200d🌈",
    "def main():\n\tprint(\"hi\")\n\treturn 0\n",
    "    indented code\n        deeper\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after a literal bos",
    "</s> and <eos> and <unk> <mask> [multimodal] <unused5> <start_of_image>",
    "<table><tr><td>cell</td></tr></table>",
    "12345678901234567890 3.14159 -42 1e10 0x1F",
    "https://example.com/path/to/page?query=1&x=y#frag",
    "MiXeD CaSe WoRdS iPhone McDonald's",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!!!!?????......------",
    "private use \ue000\uf8ff and rare CJK 𠀀𠀁𪜀",
    "line1\nline2\n\nline4\r\nend\n\n\n",
    "control chars \x00\x01\x1f\x7f here",
    "Ünïcödé àccénts naïve café résumé",
    "▁ a literal lower one eighth block ▁▁",
    "<0x41> looks like a byte token",
    "The Industrial Revolution, which began in Great Britain in the late 18th century, transformed "
    "economies that had been based on agriculture and handicrafts into economies based on large-scale "
    "industry, mechanized manufacturing, and the factory system. New machines, new power sources, and "
    "new ways of organizing work made existing industries more productive and efficient.",
]


def write_json(name, value):
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(json.dumps(value, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def make_llama():
    import ctypes

    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(MODEL), vocab_only=True, verbose=False)
    vocab = llm._model.vocab

    def detokenize(ids, unparse_special):
        arr = (llama_cpp.llama_token * max(len(ids), 1))(*ids)
        size = 64 + 64 * len(ids)
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, size, False, unparse_special)
        assert 0 <= n <= size, n
        return buf.raw[:n].hex()

    cases = []
    for text in TEXTS:
        for add_bos, parse_special in [(True, True), (True, False), (False, True)]:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=parse_special)
            cases.append({
                "text": text,
                "add_bos": add_bos,
                "parse_special": parse_special,
                "ids": ids,
                "detok_special_hex": detokenize(ids, True),
                "detok_plain_hex": detokenize(ids, False),
            })
    write_json("llama_cpp_ids.json", {
        "model": MODEL.name,
        "llama_cpp_python": llama_cpp.__version__,
        "cases": cases,
    })


# Gemma 3's official chat template, as in google/gemma-3-*-it tokenizer_config.json.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""


def msg(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = [
    [msg("user", "Hello!")],
    [msg("user", "  What is 2+2?\n\n")],
    [msg("system", "You are a helpful assistant."), msg("user", "Hi there")],
    [msg("system", "  Keep the system text as is.  "), msg("user", "\tquestion\t")],
    [msg("user", "First"), msg("assistant", "Answer one."), msg("user", "Second"), msg("assistant", " Answer two. ")],
    [msg("system", "sys"), msg("user", "a"), msg("assistant", "b"), msg("user", "c")],
    [msg("user", "Unicode: 日本語 😀 \u3000wide space\u3000")],
    [msg("user", "\u001fseparators\u001c count as space in Python\u00a0")],
    [msg("user", "Braces {{ not a variable }} and {% not a tag %}")],
    [msg("user", "")],
    [msg("system", "only a system message")],
    [msg("user", "Hi"), msg("tool", "other roles pass through at odd positions")],
    # Errors: roles out of order, empty conversation.
    [msg("user", "Hi"), msg("assistant", "Hello"), msg("tool", "but not where a user turn belongs")],
    [msg("assistant", "I speak first")],
    [msg("user", "a"), msg("user", "b")],
    [msg("system", "sys"), msg("assistant", "model first")],
    [],
]


def make_chat():
    from transformers.utils.chat_template_utils import render_jinja_template

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gemma3_chat_template.jinja").write_text(GEMMA3_TEMPLATE, encoding="utf-8")
    cases = []
    for messages in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            try:
                rendered = render_jinja_template(
                    conversations=[messages],
                    chat_template=GEMMA3_TEMPLATE,
                    add_generation_prompt=add_generation_prompt,
                    bos_token="<bos>",
                    eos_token="<eos>",
                )
                if isinstance(rendered, tuple):  # (renders, generation indices)
                    rendered = rendered[0]
                expected, error = rendered[0], None
            except Exception as e:  # the template's raise_exception or an undefined lookup
                expected, error = None, f"{type(e).__name__}: {e}"
            cases.append({
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
                "expected": expected,
                "error": error,
            })
    write_json("gemma3_chat_renders.json", cases)


HF_TRAINING_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello tokenizer, hello gemma",
    "byte fallback handles everything else",
    "the the the quick quick brown",
]
HF_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
HF_TEXTS = [
    "hello world",
    "the quick brown fox",
    " leading space",
    "unseen ZQX ünï 😀",
    "<start_of_turn>user\nhello<end_of_turn>",
    "",
]


def make_hf():
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=HF_SPECIALS, show_progress=False)
    tok.train_from_iterator(HF_TRAINING_TEXT, trainer)
    # Byte-fallback pieces belong to the model vocabulary (as in Gemma's tokenizer.json), not to
    # the added special tokens, so append them to the trained vocabulary.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(spec))
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    OUT.mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT / "tiny_tokenizer.json"))

    cases = []
    for text in HF_TEXTS:
        for parse_special in (True, False):
            tok.encode_special_tokens = not parse_special
            with_bos = tok.encode(text, add_special_tokens=True).ids
            plain = tok.encode(text, add_special_tokens=False).ids
            cases.append({
                "text": text,
                "parse_special": parse_special,
                "ids_with_bos": with_bos,
                "ids": plain,
                "decoded_skip_special": tok.decode(with_bos, skip_special_tokens=True),
                "decoded_with_special": tok.decode(with_bos, skip_special_tokens=False),
            })
    tok.encode_special_tokens = False
    write_json("tiny_tokenizer_ids.json", {"bos_id": bos, "eos_id": tok.token_to_id("<eos>"), "cases": cases})


PARTS = {"llama": make_llama, "chat": make_chat, "hf": make_hf}

if __name__ == "__main__":
    parts = sys.argv[1:] or list(PARTS)
    for part in parts:
        PARTS[part]()
