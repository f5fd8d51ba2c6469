"""gemma_rs against the `gemma` CLI built from the same sources.

Run by `cargo test --release --workspace` (crates/cli/tests/python_package.rs), which sets
GEMMA_BIN (the CLI) and GEMMA_TEST_MODEL (the default model, fetched first). By hand:

    GEMMA_BIN=target/release/gemma python -m pytest python/tests
"""

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import gemma_rs

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
VISION_MODEL = FIXTURES / "gemma3_vision_tiny" / "hf"
VISION_IMAGE = FIXTURES / "gemma3_vision_tiny" / "img_a_97x73.png"
AUDIO_MODEL = FIXTURES / "gemma3n_audio_tiny"
AUDIO_CLIP = FIXTURES / "audio" / "speech_16k_mono.wav"
VISION3N_MODEL = FIXTURES / "gemma3n_vision_tiny"
VISION3N_IMAGE = FIXTURES / "images" / "rgb_300x200.png"

GEMMA_BIN = os.environ.get("GEMMA_BIN")
MODEL_PATH = os.environ.get("GEMMA_TEST_MODEL") or str(gemma_rs.default_model_path())

PROMPTS = ["The capital of France is", "def fibonacci(n):\n"]
N = 24


def gemma(*args, check=True):
    """Runs the CLI on the test model; returns (stdout, stderr)."""
    if not GEMMA_BIN:
        pytest.skip("GEMMA_BIN is not set (the driver test sets it)")
    argv = [GEMMA_BIN, *args]
    if "--model" not in args:
        argv[1:1] = ["--model", MODEL_PATH]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, f"{argv} failed: {out.stderr}"
    return out.stdout, out.stderr


def as_printed(text):
    """What `gemma run` prints for a generated text: a newline is added unless there is one."""
    return text if text == "" or text.endswith("\n") else text + "\n"


@pytest.fixture(scope="module")
def model():
    return gemma_rs.Model(MODEL_PATH)


# --- generation equals `gemma run` ------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_raw_greedy_generate_equals_cli(model, prompt):
    out, _ = gemma("run", "-q", "--raw", "--temp", "0", "-n", str(N), prompt)
    text = model.generate(prompt, max_tokens=N, temperature=0)
    assert as_printed(text) == out
    assert text.strip(), "the model produced text"


def test_templated_generate_and_chat_equal_cli(model):
    prompt, system = "Name three colours.", "Answer in one line."
    out, _ = gemma("run", "-q", "--temp", "0", "-n", str(N), "--system", system, prompt)
    text = model.generate(prompt, raw=False, system=system, max_tokens=N, temperature=0)
    assert as_printed(text) == out
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": prompt},
    ]
    assert model.chat(messages, max_tokens=N, temperature=0) == text
    parts = [{"role": "system", "content": system},
             {"role": "user", "content": [{"type": "text", "text": prompt}]}]
    assert model.chat(parts, max_tokens=N, temperature=0) == text


def test_seeded_sampling_and_stop_strings_equal_cli(model):
    prompt = PROMPTS[0]
    out, _ = gemma("run", "-q", "--raw", "--temp", "0.9", "--seed", "7", "--top-k", "40",
                   "--top-p", "0.9", "--min-p", "0.05", "-n", str(N), prompt)
    text = model.generate(prompt, max_tokens=N, temperature=0.9, seed=7, top_k=40, top_p=0.9,
                          min_p=0.05)
    assert as_printed(text) == out

    greedy = model.generate(prompt, max_tokens=N, temperature=0)
    stop = greedy.strip().split()[1]
    out, _ = gemma("run", "-q", "--raw", "--temp", "0", "-n", str(N), "--stop", stop, prompt)
    text = model.generate(prompt, max_tokens=N, temperature=0, stop=[stop])
    assert as_printed(text) == out
    assert stop not in text and len(text) < len(greedy)
    assert model.generate(prompt, max_tokens=N, temperature=0, stop=stop) == text


def test_chat_applies_the_template(model):
    rendered = model.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    answer = model.chat([{"role": "user", "content": "Hi"}], max_tokens=N, temperature=0)
    # The chat answer is the raw continuation of the rendered template (whose <bos> is not
    # doubled by generate), cut at <end_of_turn>.
    assert model.generate(rendered, max_tokens=N, temperature=0) == answer
    assert model.tokenize(rendered, add_bos=False)[:2] == [2, 105]


# --- streaming --------------------------------------------------------------------------------


def test_stream_yields_the_generated_text(model):
    prompt = PROMPTS[1]
    stream = model.stream(prompt, max_tokens=N, temperature=0)
    assert stream.finish_reason is None
    pieces = list(stream)
    assert len(pieces) > 1, pieces
    assert "".join(pieces) == model.generate(prompt, max_tokens=N, temperature=0)
    assert stream.finish_reason == "length"

    messages = [{"role": "user", "content": "Say hello."}]
    chat_stream = model.stream_chat(messages, max_tokens=N, temperature=0)
    assert "".join(chat_stream) == model.chat(messages, max_tokens=N, temperature=0)
    assert chat_stream.finish_reason in ("stop", "length")


def test_closing_a_stream_stops_it(model):
    stream = model.stream(PROMPTS[0], max_tokens=500, temperature=0)
    first = next(stream)
    assert first
    stream.close()
    assert stream.finish_reason == "cancelled"
    assert list(stream) == []
    # Dropping an unfinished stream is fine too.
    del stream
    assert model.generate(PROMPTS[0], max_tokens=2, temperature=0)


# --- tokens and logits ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["Hello world", "<start_of_turn>user\nhi<end_of_turn>", "  spaces\tand ünïcødé 🙂"]
)
def test_tokenize_equals_cli(model, text):
    for flags, kwargs in [
        ([], {}),
        (["--no-bos"], {"add_bos": False}),
        (["--no-special"], {"special": False}),
        (["--no-bos", "--no-special"], {"add_bos": False, "special": False}),
    ]:
        out, _ = gemma("tokenize", "-q", *flags, text)
        assert model.tokenize(text, **kwargs) == json.loads(out), flags
    assert model.detokenize(model.tokenize(text, add_bos=False)) == text


def test_logits_equal_cli(model):
    ids = model.tokenize("The quick brown fox jumps over the")
    logits = model.logits(ids)
    assert isinstance(logits, np.ndarray)
    assert logits.dtype == np.float32 and logits.shape == (model.vocab_size,)
    out, _ = gemma("logits", "-q", "--top", "10", "--ids", ",".join(map(str, ids)))
    reference = json.loads(out)
    assert reference["ids"] == ids
    top = np.argsort(-logits, kind="stable")[:10]
    assert [int(i) for i in top] == [i for i, _ in reference["top"]]
    np.testing.assert_allclose(logits[top], [v for _, v in reference["top"]], rtol=0, atol=1e-4)
    # A text prompt is tokenized as `gemma logits PROMPT` does.
    np.testing.assert_array_equal(model.logits("The quick brown fox jumps over the"), logits)
    with pytest.raises(gemma_rs.GemmaError, match="outside the vocabulary"):
        model.logits([2, model.vocab_size + 5])


# --- errors -----------------------------------------------------------------------------------


def cli_error(*args):
    _, err = gemma(*args, check=False)
    assert err.startswith("error: "), err
    return err.strip()[len("error: "):]


def test_bad_model_paths_raise_the_engine_message(tmp_path):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(FileNotFoundError) as e:
        gemma_rs.Model(missing)
    assert str(e.value) == cli_error("--model", str(missing), "tokenize", "x")
    assert str(missing) in str(e.value)

    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(gemma_rs.GemmaError) as e:
        gemma_rs.Model(str(corrupt))
    assert isinstance(e.value, RuntimeError)
    assert str(e.value) == cli_error("--model", str(corrupt), "tokenize", "x")


def test_bad_arguments_are_value_errors(model):
    with pytest.raises(ValueError, match="temperature"):
        model.generate("x", temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate("x", top_p=2)
    with pytest.raises(ValueError, match="system"):
        model.generate("x", system="s")
    with pytest.raises(ValueError, match="threads"):
        gemma_rs.Model(MODEL_PATH, threads=0)
    with pytest.raises(ValueError, match="cache_type"):
        gemma_rs.Model(MODEL_PATH, cache_type="f8")
    with pytest.raises(ValueError, match="role"):
        model.chat([{"content": "x"}])
    with pytest.raises(gemma_rs.GemmaError, match="context size"):
        gemma_rs.Model(MODEL_PATH, n_ctx=8).generate("word " * 20)
    with pytest.raises(gemma_rs.GemmaError, match="takes no images"):
        model.generate("x", images=[b"not an image"])


# --- threads ----------------------------------------------------------------------------------


def test_generate_releases_the_gil(model):
    counter = [0]
    done = threading.Event()

    def count():
        while not done.is_set():
            counter[0] += 1

    thread = threading.Thread(target=count)
    thread.start()
    time.sleep(0.05)
    before, start = counter[0], time.perf_counter()
    text = model.generate(PROMPTS[0], max_tokens=48, temperature=0)
    counted, elapsed = counter[0] - before, time.perf_counter() - start
    done.set()
    thread.join()
    assert text
    # A pure-Python loop counts millions per second while the GIL is free; had generate held
    # the GIL, the counter could not have moved between the two reads (one switch interval at
    # most).
    print(f"counted {counted} in {elapsed:.2f} s of generate")
    assert counted > 100_000 * max(elapsed, 0.5), (counted, elapsed)


def test_two_threads_generate_at_once(model):
    prompts = PROMPTS
    expected = [model.generate(p, max_tokens=N, temperature=0) for p in prompts]
    times = [[] for _ in prompts]
    results = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def work(i):
        barrier.wait()
        pieces = []
        for piece in model.stream(prompts[i], max_tokens=N, temperature=0):
            times[i].append(time.perf_counter())
            pieces.append(piece)
        results[i] = "".join(pieces)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected
    a, b = times
    # The two generations interleave: each produced text while the other was under way.
    assert b[0] < a[-1] and a[0] < b[-1], (a, b)

    # And plain generate calls from two threads overlap in time.
    spans = [None, None]

    def plain(i):
        barrier.wait()
        start = time.perf_counter()
        results[i] = model.generate(prompts[i], max_tokens=N, temperature=0)
        spans[i] = (start, time.perf_counter())

    threads = [threading.Thread(target=plain, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected
    (s0, e0), (s1, e1) = spans
    assert max(s0, s1) < min(e0, e1), spans


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("streamed", [False, True])
def test_ctrl_c_stops_generation(model, streamed):
    """A SIGINT during generation raises from the call (the handler runs while the engine
    computes without the GIL)."""
    import _thread
    import signal

    def handler(signum, frame):
        raise Interrupted()

    previous = signal.signal(signal.SIGINT, handler)
    timer = threading.Timer(0.5, _thread.interrupt_main)
    try:
        start = time.perf_counter()
        timer.start()
        with pytest.raises(Interrupted):
            prompt = ", ".join(str(i) for i in range(1, 30))
            if streamed:
                for _ in model.stream(prompt, max_tokens=4000, temperature=0, stop=None):
                    pass
            else:
                model.generate(prompt, max_tokens=4000, temperature=0)
        assert time.perf_counter() - start < 10
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)


# --- structured output ------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age"],
}


def test_json_schema_output_validates_and_equals_cli(model, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    prompt = "Describe a person as JSON."
    text = model.generate(prompt, raw=False, json_schema=SCHEMA, temperature=0, max_tokens=96)
    jsonschema.validate(json.loads(text), SCHEMA)
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    out, _ = gemma("run", "-q", "--temp", "0", "-n", "96", "--json-schema", str(schema_file),
                   prompt)
    assert out == text + "\n"
    # The schema as JSON text, sampled, streamed, and through chat.
    sampled = model.chat([{"role": "user", "content": prompt}], json_schema=json.dumps(SCHEMA),
                         seed=3, max_tokens=96)
    jsonschema.validate(json.loads(sampled), SCHEMA)
    streamed = "".join(model.stream(prompt, raw=False, json_schema=SCHEMA, temperature=0,
                                    max_tokens=96))
    assert streamed == text
    with pytest.raises(ValueError, match="unsupported JSON schema"):
        model.generate(prompt, json_schema={"$ref": "#/$defs/missing"})
    with pytest.raises(gemma_rs.GemmaError, match="cut short"):
        model.generate(prompt, json_schema=SCHEMA, max_tokens=2)


# --- images (the tiny Gemma 3 vision fixture) -------------------------------------------------


def test_images_equal_cli():
    vision = gemma_rs.Model(VISION_MODEL, n_ctx=512)
    assert vision.has_vision
    prompt = "Describe this image."
    out, _ = gemma("--model", str(VISION_MODEL), "--ctx-size", "512", "run", "-q",
                   "--image", str(VISION_IMAGE), "--temp", "0", "-n", "4", prompt)
    text = vision.generate(prompt, raw=False, images=[VISION_IMAGE], temperature=0, max_tokens=4)
    assert as_printed(text) == out
    data = VISION_IMAGE.read_bytes()
    assert vision.generate(prompt, raw=False, images=[data], temperature=0, max_tokens=4) == text
    message = {"role": "user", "content": [{"type": "image", "image": str(VISION_IMAGE)},
                                           {"type": "text", "text": prompt}]}
    assert vision.chat([message], temperature=0, max_tokens=4) == text
    assert vision.chat([{"role": "user", "content": prompt}], images=[data], temperature=0,
                       max_tokens=4) == text
    with pytest.raises(gemma_rs.GemmaError, match="image"):
        vision.generate(prompt, images=[b"not an image"], max_tokens=1)

    # Logits with an image, from a text prompt and from ids with the image-token runs.
    out, _ = gemma("--model", str(VISION_MODEL), "--ctx-size", "512", "logits", "-q",
                   "--image", str(VISION_IMAGE), "--top", "5", prompt)
    reference = json.loads(out)
    for source in (prompt, reference["ids"]):
        logits = vision.logits(source, images=[VISION_IMAGE])
        top = np.argsort(-logits, kind="stable")[:5]
        assert [int(i) for i in top] == [i for i, _ in reference["top"]]
        np.testing.assert_allclose(logits[top], [v for _, v in reference["top"]], atol=1e-4)
    with pytest.raises(gemma_rs.GemmaError, match="no image was given"):
        vision.logits(reference["ids"])


# --- audio (the tiny Gemma 3n audio fixture) ---------------------------------------------------


def test_audio_equals_cli_and_the_reference():
    hearing = gemma_rs.Model(AUDIO_MODEL, n_ctx=256)
    assert hearing.has_audio and not hearing.has_vision
    reference = json.loads((AUDIO_MODEL / "reference.json").read_text())["chat"]
    # EOS and <end_of_turn> suppressed, as the reference's greedy continuation was made.
    bias = {1: -100.0, 6: -100.0}
    text = hearing.transcribe(AUDIO_CLIP, max_tokens=12, logit_bias=bias)
    assert text == reference["greedy_text"].strip()
    out, _ = gemma("--model", str(AUDIO_MODEL), "transcribe", "-q", str(AUDIO_CLIP), "-n", "12",
                   "-l", "1=-100", "-l", "6=-100")
    assert as_printed(text) == out
    assert hearing.transcribe(AUDIO_CLIP.read_bytes(), max_tokens=12, logit_bias=bias) == text
    # A chat message with an audio part asks the same question.
    message = {"role": "user", "content": [{"type": "audio", "audio": str(AUDIO_CLIP)},
                                           {"type": "text", "text": "Transcribe this audio."}]}
    assert hearing.apply_chat_template([message]) == reference["prompt"]
    out, _ = gemma("--model", str(AUDIO_MODEL), "run", "-q", "--audio", str(AUDIO_CLIP),
                   "--temp", "0", "-n", "4", "Transcribe this audio.")
    assert as_printed(hearing.chat([message], temperature=0, max_tokens=4)) == out
    # Logits from the reference's ids with the audio run filled.
    ids = reference["input_ids"]
    vocab = hearing.vocab_size
    want = np.array(reference["logits"][-vocab:], dtype=np.float32)
    got = hearing.logits(ids, audio=[AUDIO_CLIP])
    np.testing.assert_allclose(got, want, atol=1e-2)
    with pytest.raises(gemma_rs.GemmaError, match="window"):
        hearing.logits(ids)
    with pytest.raises(gemma_rs.GemmaError, match="audio"):
        hearing.transcribe(b"not audio at all")


def test_gemma3n_image_and_audio_in_one_message():
    m = gemma_rs.Model(VISION3N_MODEL, n_ctx=1024)
    assert m.has_vision and m.has_audio
    reference = json.loads((VISION3N_MODEL / "reference.json").read_text())
    p = reference["prompts"]["image_audio_text"]
    vocab = m.vocab_size
    want = np.fromfile(VISION3N_MODEL / p["logits"], dtype="<f4").reshape(-1, vocab)[-1]
    # The reference's ids, the image run and the audio run filled in order.
    got = m.logits(p["input_ids"], images=[VISION3N_IMAGE], audio=[AUDIO_CLIP])
    np.testing.assert_allclose(got, want, atol=1e-2)
    # Parts in the reference's order: the rendered prompt is the reference's (our image slot is
    # written <start_of_image>, which the engine expands as the processor expands
    # <image_soft_token>), and greedy chat equals the CLI with the media in the same order.
    message = {"role": "user", "content": [
        {"type": "image", "image": str(VISION3N_IMAGE)},
        {"type": "text", "text": "What is said in this recording?"},
        {"type": "audio", "audio": str(AUDIO_CLIP)},
        {"type": "text", "text": "Who is speaking?"}]}
    rendered = m.apply_chat_template([message])
    assert rendered.replace("<start_of_image>", "<image_soft_token>") == p["prompt"]
    short = {"role": "user", "content": [
        {"type": "audio", "audio": str(AUDIO_CLIP)},
        {"type": "image", "image": VISION3N_IMAGE.read_bytes()},
        {"type": "text", "text": "Who is speaking?"}]}
    out, _ = gemma("--model", str(VISION3N_MODEL), "run", "-q", "--audio", str(AUDIO_CLIP),
                   "--image", str(VISION3N_IMAGE), "--temp", "0", "-n", "4", "Who is speaking?")
    assert as_printed(m.chat([short], temperature=0, max_tokens=4)) == out
    with pytest.raises(gemma_rs.GemmaError, match="image"):
        m.logits(p["input_ids"], audio=[AUDIO_CLIP])


def test_audio_for_a_text_model_is_refused(model):
    assert not model.has_audio
    with pytest.raises(gemma_rs.GemmaError, match="takes no audio"):
        model.transcribe(AUDIO_CLIP)


def test_default_model_is_the_cli_default():
    assert Path(MODEL_PATH).name == gemma_rs.DEFAULT_MODEL_FILE or "GEMMA_TEST_MODEL" in os.environ
    if Path(MODEL_PATH) != gemma_rs.default_model_path():
        pytest.skip("the test model is not the cached default model")
    model = gemma_rs.Model()
    assert model.path == gemma_rs.default_model_path()
    assert "gemma3" in repr(model)
