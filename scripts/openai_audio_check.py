#!/usr/bin/env python3
"""Drives a running `gemma serve` with a Gemma 3n model that has an audio tower through the
official `openai` Python client: `audio.transcriptions.create` (json, text, verbose_json, and
stream=True), `audio.translations.create`, and chat requests with `input_audio` parts (plain
and streamed, WAV and MP3), each transcription checked against the chat answer to the same
prompt; bad audio is a 400.
Run by `crates/server/tests/audio.rs` against the tiny fixture model, or by hand:
openai_audio_check.py BASE_URL AUDIO_DIR [REFERENCE_JSON]
Exits non-zero on the first failed check."""

import base64
import json
import os
import sys

import openai

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/v1"
audio_dir = sys.argv[2] if len(sys.argv) > 2 else "fixtures/audio"
# The fixture's reference.json: the greedy continuation of its chat case.
reference = json.load(open(sys.argv[3])) if len(sys.argv) > 3 else None
client = openai.OpenAI(base_url=base, api_key="unused")


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + (f": {detail}" if detail and not ok else ""))
    if not ok:
        sys.exit(1)


def path(name):
    return os.path.join(audio_dir, name)


def audio_part(name, fmt):
    with open(path(name), "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


def chat(content, **kw):
    kw.setdefault("max_tokens", 512)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0, **kw
    )


model = client.models.list().data[0].id
wav = "speech_16k_mono.wav"

# The transcription prompt is the user turn [audio, "Transcribe this audio."].
answer = chat([audio_part(wav, "wav"), {"type": "text", "text": "Transcribe this audio."}])
want = answer.choices[0].message.content.strip()
check("chat with input_audio", want != "" and answer.usage.prompt_tokens > 16, answer)

with open(path(wav), "rb") as f:
    t = client.audio.transcriptions.create(model=model, file=f)
check("transcription equals the chat answer", t.text == want, (t.text, want))

with open(path(wav), "rb") as f:
    text = client.audio.transcriptions.create(model=model, file=f, response_format="text")
check("response_format text", text == want, text)

with open(path(wav), "rb") as f:
    verbose = client.audio.transcriptions.create(
        model=model, file=f, response_format="verbose_json", timestamp_granularities=["segment"]
    )
check("verbose_json", verbose.text == want and len(verbose.segments) == 1
      and verbose.segments[0].text == want and abs(verbose.duration - 2.0077) < 1e-3, verbose)

with open(path(wav), "rb") as f:
    stream = client.audio.transcriptions.create(model=model, file=f, stream=True)
    deltas, done = [], None
    for event in stream:
        if event.type == "transcript.text.delta":
            deltas.append(event.delta)
        elif event.type == "transcript.text.done":
            done = event
check("streamed transcription", len(deltas) > 1 and "".join(deltas) == want
      and done is not None and done.text == want, (deltas, done))

# Translation: the prompt asks for English.
answer = chat([audio_part(wav, "wav"), {"type": "text", "text": "Translate this audio into English."}])
with open(path(wav), "rb") as f:
    tr = client.audio.translations.create(model=model, file=f)
check("translation equals the chat answer", tr.text == answer.choices[0].message.content.strip(),
      (tr.text, answer))

# MP3, in chat and as an upload.
mp3 = "speech_24k_mono.mp3"
answer = chat([audio_part(mp3, "mp3"), {"type": "text", "text": "Transcribe this audio."}])
with open(path(mp3), "rb") as f:
    t = client.audio.transcriptions.create(model=model, file=f)
check("mp3 transcription equals the chat answer", t.text == answer.choices[0].message.content.strip(),
      (t.text, answer))

# The reference's greedy continuation (EOS and <end_of_turn> suppressed, as it was made).
if reference:
    case = reference["chat"]
    content = [audio_part(wav, "wav"), {"type": "text", "text": case["messages"][0]["content"][1]["text"]}]
    r = chat(content, max_tokens=12, logit_bias={"1": -100, "6": -100})
    check("reference greedy text", r.choices[0].message.content == case["greedy_text"]
          and r.usage.prompt_tokens == len(case["input_ids"]), r)
    stream = chat(content, max_tokens=12, logit_bias={"1": -100, "6": -100}, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    check("streamed chat with input_audio", text == case["greedy_text"], text)

# Bad audio: 400s with the reason.
with open(path(wav), "rb") as f:
    half = base64.b64encode(f.read()[:3000]).decode()
for part, words in [
    ({"type": "input_audio", "input_audio": {"data": half, "format": "wav"}}, "truncated"),
    ({"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}, "base64"),
    (audio_part(wav, "aiff"), "format"),
]:
    try:
        chat([part], max_tokens=2)
        check(f"bad audio ({words}) rejected", False)
    except openai.BadRequestError as e:
        check(f"bad audio ({words}) rejected with 400", e.status_code == 400 and words in str(e)
              and e.body.get("param") == "messages[0].content[0].input_audio", e)
try:
    client.audio.transcriptions.create(model=model, file=("notes.txt", b"not audio at all"))
    check("a text file is not transcribed", False)
except openai.BadRequestError as e:
    check("a text file is a 400", e.status_code == 400 and "not a supported audio file" in str(e), e)

print("all checks passed")
