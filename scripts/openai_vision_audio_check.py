#!/usr/bin/env python3
"""Drives a running `gemma serve` with a Gemma 3n model that has vision and audio towers through
the official `openai` Python client: one chat message holding an image (`image_url`, a data URL)
and an audio clip (`input_audio`) between text parts, plain and streamed, and the same content
through the Responses API (`input_image`, `input_audio`). With the fixture's reference.json the
prompt must be the reference processor's (same token count) and greedy decoding must start with
the reference's argmax.
Run by `crates/server/tests/gemma3n_vision.rs` against fixtures/gemma3n_vision_tiny, or by hand:
openai_vision_audio_check.py BASE_URL FIXTURES_DIR [REFERENCE_JSON]
Exits non-zero on the first failed check."""

import base64
import json
import os
import sys

import openai

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/v1"
fixtures = sys.argv[2] if len(sys.argv) > 2 else "fixtures"
reference = json.load(open(sys.argv[3])) if len(sys.argv) > 3 else None
client = openai.OpenAI(base_url=base, api_key="unused")


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + (f": {detail}" if detail and not ok else ""))
    if not ok:
        sys.exit(1)


def b64(rel):
    with open(os.path.join(fixtures, rel), "rb") as f:
        return base64.b64encode(f.read()).decode()


image_url = "data:image/png;base64," + b64("images/rgb_300x200.png")
audio_data = b64("audio/speech_16k_mono.wav")
content = [
    {"type": "image_url", "image_url": {"url": image_url}},
    {"type": "text", "text": "What is said in this recording?"},
    {"type": "input_audio", "input_audio": {"data": audio_data, "format": "wav"}},
    {"type": "text", "text": "Who is speaking?"},
]
model = client.models.list().data[0].id

answer = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=8
)
text = answer.choices[0].message.content
check("chat with an image and an audio clip in one message",
      answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens >= 1,
      answer)
if reference is not None:
    want = len(reference["prompts"]["image_audio_text"]["input_ids"])
    check("prompt tokens equal the reference processor's", answer.usage.prompt_tokens == want,
          (answer.usage.prompt_tokens, want))

stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=8,
    stream=True,
)
streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
check("streamed answer equals the plain one", streamed == text, (streamed, text))

# The audio before the image is another prompt: both are accepted, in the order given.
swapped = [content[2], content[1], content[0], content[3]]
other = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": swapped}], temperature=0, max_tokens=8
)
check("audio before the image", other.usage.prompt_tokens == answer.usage.prompt_tokens, other)

r = client.responses.create(
    model=model,
    input=[{
        "role": "user",
        "content": [
            {"type": "input_image", "image_url": image_url},
            {"type": "input_text", "text": "What is said in this recording?"},
            {"type": "input_audio", "input_audio": {"data": audio_data, "format": "wav"}},
            {"type": "input_text", "text": "Who is speaking?"},
        ],
    }],
    temperature=0,
    max_output_tokens=8,
)
check("responses API with an image and an audio clip", r.output_text == text, (r.output_text, text))

try:
    client.chat.completions.create(
        model=model, temperature=0, max_tokens=4,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "text", "text": "Hi"}]}],
    )
    check("a broken image is refused", False, "accepted")
except openai.BadRequestError as e:
    check("a broken image is a 400", e.status_code == 400, e)

print("all checks passed")
