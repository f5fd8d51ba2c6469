//! Audio through the server, against the tiny random Gemma 3n with an audio tower of
//! `fixtures/gemma3n_audio_tiny/`: an `input_audio` chat part reproduces the reference's greedy
//! continuation; `/v1/audio/transcriptions` and `/translations` answer exactly what a chat
//! request with the same rendered prompt (the window's audio and the task's instruction)
//! answers, in every response format and streamed, window by window for a clip longer than
//! the model's window; the prefix cache tells clips apart; and every bad input is a 400.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;

use common::*;
use gemma_engine::audio::AudioTask;
use gemma_engine::gemma_media::AudioLimits;
use gemma_engine::{AudioOptions, LoadedModel};
use gemma_server::{MediaConfig, RunningServer, ServerConfig};
use serde_json::{json, Value};

const CTX: usize = 512;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir() -> PathBuf {
    root().join("fixtures/gemma3n_audio_tiny")
}

fn reference() -> &'static Value {
    static R: OnceLock<Value> = OnceLock::new();
    R.get_or_init(|| {
        let text = std::fs::read_to_string(model_dir().join("reference.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

fn load() -> LoadedModel {
    gemma_engine::load(Some(&model_dir()), &Default::default()).expect("the fixture loads")
}

fn start(config: ServerConfig) -> RunningServer {
    std::env::set_var("GEMMA_THREADS", "1");
    let config = ServerConfig { port: 0, ..config };
    gemma_server::start(load(), config).expect("the server starts")
}

fn config(parallel: usize) -> ServerConfig {
    ServerConfig {
        parallel,
        ctx_size: CTX,
        queue_capacity: 16,
        body_limit: 4 * 1024 * 1024,
        ..ServerConfig::default()
    }
}

/// The server most tests share.
fn server() -> SocketAddr {
    static SERVER: OnceLock<RunningServer> = OnceLock::new();
    SERVER.get_or_init(|| start(config(2))).addr
}

fn clip(name: &str) -> Vec<u8> {
    std::fs::read(root().join("fixtures/audio").join(name)).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn audio_part(bytes: &[u8], format: &str) -> Value {
    json!({"type": "input_audio", "input_audio": {"data": b64(bytes), "format": format}})
}

/// The 16-bit samples of a mono PCM WAV file.
fn wav_samples(bytes: &[u8]) -> Vec<i16> {
    let data = bytes
        .windows(4)
        .position(|w| w == b"data")
        .expect("a data chunk");
    let len = u32::from_le_bytes(bytes[data + 4..data + 8].try_into().unwrap()) as usize;
    bytes[data + 8..data + 8 + len]
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// A 16 kHz mono 16-bit WAV file.
fn wav(samples: &[i16]) -> Vec<u8> {
    let n = (samples.len() * 2) as u32;
    let mut out = b"RIFF".to_vec();
    out.extend((36 + n).to_le_bytes());
    out.extend(b"WAVEfmt ");
    out.extend(16u32.to_le_bytes());
    out.extend(1u16.to_le_bytes()); // PCM
    out.extend(1u16.to_le_bytes()); // mono
    out.extend(16_000u32.to_le_bytes());
    out.extend(32_000u32.to_le_bytes());
    out.extend(2u16.to_le_bytes());
    out.extend(16u16.to_le_bytes());
    out.extend(b"data");
    out.extend(n.to_le_bytes());
    for s in samples {
        out.extend(s.to_le_bytes());
    }
    out
}

/// A form field: text, or a file with its name.
enum Field<'a> {
    Text(&'a str),
    File(&'a str, &'a [u8]),
}

/// Posts a multipart/form-data body.
fn post_form(addr: SocketAddr, path: &str, fields: &[(&str, Field<'_>)]) -> HttpResponse {
    let boundary = "----gemma-test-boundary-7d1f";
    let mut body = Vec::new();
    for (name, field) in fields {
        body.extend(format!("--{boundary}\r\n").as_bytes());
        match field {
            Field::Text(value) => {
                body.extend(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                        .as_bytes(),
                );
            }
            Field::File(file_name, bytes) => {
                body.extend(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; \
                         filename=\"{file_name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend(*bytes);
                body.extend(b"\r\n");
            }
        }
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    request_typed(
        addr,
        "POST",
        path,
        &format!("multipart/form-data; boundary={boundary}"),
        Some(&body),
    )
}

/// A transcription or translation of `file` with extra fields; the response must be 200.
fn transcribe(addr: SocketAddr, path: &str, file: &[u8], extra: &[(&str, &str)]) -> HttpResponse {
    let mut fields = vec![
        ("file", Field::File("clip.wav", file)),
        ("model", Field::Text("gemma")),
    ];
    fields.extend(extra.iter().map(|(k, v)| (*k, Field::Text(v))));
    let r = post_form(addr, path, &fields);
    assert_eq!(r.status, 200, "{path} {extra:?}: {}", r.text());
    r
}

/// The chat answer to one user turn of `file`'s audio then `text`, greedy, with the cap a
/// transcription window has.
fn chat_answer(addr: SocketAddr, file: &[u8], text: &str) -> Value {
    let body = parts_body(vec![audio_part(file, "wav"), text_part(text)], 512);
    let r = post(addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {v}"))
        .to_owned()
}

#[test]
fn an_input_audio_part_reproduces_the_reference_greedy_text() {
    let chat = &reference()["chat"];
    let parts = &chat["messages"][0]["content"];
    let name = format!("{}.wav", parts[0]["clip"].as_str().unwrap());
    let mut body = parts_body(
        vec![
            audio_part(&clip(&name), "wav"),
            text_part(parts[1]["text"].as_str().unwrap()),
        ],
        12,
    );
    body["logit_bias"] = json!({"1": -100, "6": -100});
    let r = post(server(), "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(content(&v), chat["greedy_text"].as_str().unwrap(), "{v}");
    let ids = chat["input_ids"].as_array().unwrap().len();
    assert_eq!(v["usage"]["prompt_tokens"], ids, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    // Streamed, the same.
    let chunks = post_stream(server(), &body);
    assert_eq!(streamed_content(&chunks), content(&v));
    // A data URL in `data`, and a format named in capitals, are the same clip.
    let mut body2 = body.clone();
    body2["messages"][0]["content"][0]["input_audio"] = json!({
        "data": data_url("audio/wav", &clip(&name)), "format": "WAV"});
    let r = post(server(), "/v1/chat/completions", &body2);
    assert_eq!(content(&r.json()), content(&v));
    // The Responses API takes the same part.
    let r = post(
        server(),
        "/v1/responses",
        &json!({
            "input": [{"role": "user", "content": [
                body["messages"][0]["content"][0],
                {"type": "input_text", "text": parts[1]["text"]},
            ]}],
            "max_output_tokens": 12, "temperature": 0,
        }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json();
    assert_eq!(out["usage"]["input_tokens"], ids, "{out}");
}

/// The transcription of a clip within one window is the chat answer to [audio, the
/// instruction], in every format; its first tokens are the reference's greedy ones (the
/// fixture's argmax never lands on EOS or `<end_of_turn>` there).
#[test]
fn a_transcription_is_the_chat_answer_to_its_prompt() {
    let addr = server();
    let file = clip("speech_16k_mono.wav");
    let chat = chat_answer(addr, &file, &AudioTask::Transcribe.instruction());
    let want = content(&chat).trim().to_owned();
    assert!(
        want.starts_with(reference()["chat"]["greedy_text"].as_str().unwrap()),
        "{want:?}"
    );
    let path = "/v1/audio/transcriptions";
    let json_reply = transcribe(addr, path, &file, &[]).json();
    assert_eq!(json_reply["text"], want.as_str(), "{json_reply}");
    assert_eq!(json_reply["usage"]["type"], "tokens");
    assert_eq!(
        json_reply["usage"]["input_tokens"],
        chat["usage"]["prompt_tokens"]
    );
    assert_eq!(
        json_reply["usage"]["output_tokens"],
        chat["usage"]["completion_tokens"]
    );
    let text = transcribe(addr, path, &file, &[("response_format", "text")]);
    assert!(text
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(text.text(), want);
    let verbose = transcribe(addr, path, &file, &[("response_format", "verbose_json")]).json();
    assert_eq!(verbose["task"], "transcribe");
    assert_eq!(verbose["text"], want.as_str());
    let duration = verbose["duration"].as_f64().unwrap();
    assert!((duration - 2.0076875).abs() < 1e-6, "{verbose}");
    let segments = verbose["segments"].as_array().unwrap();
    assert_eq!(segments.len(), 1, "{verbose}");
    assert_eq!(segments[0]["id"], 0);
    assert_eq!(segments[0]["start"], 0.0);
    assert_eq!(segments[0]["end"].as_f64().unwrap(), duration);
    assert_eq!(segments[0]["text"], want.as_str());
    let tokens = segments[0]["tokens"].as_array().unwrap();
    assert_eq!(
        tokens.len() + 1,
        chat["usage"]["completion_tokens"].as_u64().unwrap() as usize,
        "the tokens of the text, without the stop token"
    );
    let greedy = reference()["chat"]["greedy_continuation"]
        .as_array()
        .unwrap();
    assert_eq!(&tokens[..greedy.len()], &greedy[..]);
    assert!(segments[0]["avg_logprob"].as_f64().unwrap() < 0.0);
    let srt = transcribe(addr, path, &file, &[("response_format", "srt")]).text();
    assert_eq!(srt, format!("1\n00:00:00,000 --> 00:00:02,008\n{want}\n\n"));
    let vtt = transcribe(addr, path, &file, &[("response_format", "vtt")]).text();
    assert_eq!(
        vtt,
        format!("WEBVTT\n\n00:00:00.000 --> 00:00:02.008\n{want}\n\n")
    );

    // Streamed: deltas that add up to the text, then the done event with it.
    let r = transcribe(addr, path, &file, &[("stream", "true")]);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let events: Vec<Value> = r
        .sse_data()
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (done, deltas) = events.split_last().unwrap();
    assert!(deltas.len() > 1, "{events:?}");
    assert!(deltas.iter().all(|d| d["type"] == "transcript.text.delta"));
    let streamed: String = deltas
        .iter()
        .map(|d| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, want);
    assert_eq!(done["type"], "transcript.text.done");
    assert_eq!(done["text"], want.as_str());
    assert_eq!(done["usage"], json_reply["usage"]);

    // `prompt` follows the instruction; a `language` hint is a sentence after it.
    let r = transcribe(addr, path, &file, &[("prompt", "Names: Ada, Alan.")]).json();
    let chat = chat_answer(
        addr,
        &file,
        &format!("{} Names: Ada, Alan.", AudioTask::Transcribe.instruction()),
    );
    assert_eq!(r["text"], content(&chat).trim());
    let r = transcribe(
        addr,
        path,
        &file,
        &[("language", "fr"), ("response_format", "verbose_json")],
    )
    .json();
    let chat = chat_answer(
        addr,
        &file,
        &format!(
            "{} The speech is in French.",
            AudioTask::Transcribe.instruction()
        ),
    );
    assert_eq!(r["text"], content(&chat).trim());
    assert_eq!(r["language"], "french");
}

#[test]
fn a_translation_is_the_chat_answer_to_its_prompt() {
    let addr = server();
    let file = clip("speech_8k_mono.wav");
    let instruction = AudioTask::Translate { to: "en".into() }.instruction();
    assert_eq!(instruction, "Translate this audio into English.");
    let want = content(&chat_answer(addr, &file, &instruction))
        .trim()
        .to_owned();
    let path = "/v1/audio/translations";
    assert_eq!(
        transcribe(addr, path, &file, &[]).json()["text"],
        want.as_str()
    );
    let verbose = transcribe(addr, path, &file, &[("response_format", "verbose_json")]).json();
    assert_eq!(verbose["task"], "translate");
    assert_eq!(verbose["text"], want.as_str());
    let r = transcribe(
        addr,
        path,
        &file,
        &[("stream", "true"), ("response_format", "text")],
    );
    let last: Value = serde_json::from_str(r.sse_data().last().unwrap()).unwrap();
    assert_eq!(last["text"], want.as_str());
    // The transcription of the same clip is another prompt, and another answer.
    let transcription = transcribe(addr, "/v1/audio/transcriptions", &file, &[]).json();
    assert_ne!(transcription["text"], want.as_str());
}

/// A clip longer than the model's window (2.59 s for the tiny model, 30 s for the real ones)
/// is transcribed window by window: each segment is the chat answer to that stretch of audio
/// alone, and the text joins them.
#[test]
fn long_clips_are_transcribed_window_by_window() {
    let addr = server();
    let one = wav_samples(&clip("speech_16k_mono.wav"));
    let samples: Vec<i16> = [&one[..], &one[..], &one[..]].concat();
    let file = wav(&samples);
    // Where the engine cuts the clip.
    let cuts = load()
        .prepare_audio(&file, &AudioOptions::default())
        .unwrap()
        .starts;
    assert!(cuts.len() >= 3, "{cuts:?}");
    let verbose = transcribe(
        addr,
        "/v1/audio/transcriptions",
        &file,
        &[("response_format", "verbose_json")],
    )
    .json();
    let segments = verbose["segments"].as_array().unwrap();
    assert_eq!(segments.len(), cuts.len(), "{verbose}");
    let instruction = AudioTask::Transcribe.instruction();
    let mut texts = Vec::new();
    for (i, s) in segments.iter().enumerate() {
        assert_eq!(s["id"], i);
        assert_eq!(s["start"].as_f64().unwrap(), cuts[i]);
        let end = cuts
            .get(i + 1)
            .copied()
            .unwrap_or(samples.len() as f64 / 16_000.0);
        assert_eq!(s["end"].as_f64().unwrap(), end);
        let piece =
            &samples[(cuts[i] * 16_000.0).round() as usize..(end * 16_000.0).round() as usize];
        let want = content(&chat_answer(addr, &wav(piece), &instruction))
            .trim()
            .to_owned();
        assert_eq!(s["text"], want.as_str(), "segment {i}");
        texts.push(want);
    }
    let joined = texts
        .iter()
        .filter(|t| !t.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(verbose["text"], joined.as_str());
    let r = transcribe(
        addr,
        "/v1/audio/transcriptions",
        &file,
        &[("stream", "true")],
    );
    let events: Vec<Value> = r
        .sse_data()
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = events.iter().filter_map(|e| e["delta"].as_str()).collect();
    assert_eq!(streamed, joined);
    assert_eq!(events.last().unwrap()["text"], joined.as_str());
}

/// Every clip sits on the same audio-token ids; the prefix cache must compare the audio.
#[test]
fn the_prefix_cache_tells_clips_apart() {
    let server = start(config(1));
    let fresh = start(config(1));
    let a = clip("speech_16k_mono.wav");
    let b = clip("clipping_16k_mono.wav");
    let path = "/v1/audio/transcriptions";
    let text_a = transcribe(server.addr, path, &a, &[]).json()["text"].clone();
    let text_b = transcribe(server.addr, path, &b, &[]).json()["text"].clone();
    assert_ne!(text_a, text_b);
    assert_eq!(transcribe(fresh.addr, path, &b, &[]).json()["text"], text_b);
    assert_eq!(
        transcribe(server.addr, path, &a, &[]).json()["text"],
        text_a
    );
    server.stop().unwrap();
    fresh.stop().unwrap();
}

fn assert_error(r: &HttpResponse, status: u16, words: &str, param: Option<&str>) {
    assert_eq!(r.status, status, "{words}: {}", r.text());
    let v = r.json();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(words), "{words:?} not in {message:?}");
    if let Some(param) = param {
        assert_eq!(v["error"]["param"], param, "{v}");
    }
}

#[test]
fn bad_audio_in_chat_is_a_400_naming_the_part() {
    let addr = server();
    let wav_bytes = clip("speech_16k_mono.wav");
    let param = "messages[0].content[1].input_audio";
    let ask = |part: Value| {
        post(
            addr,
            "/v1/chat/completions",
            &parts_body(vec![text_part("Listen:"), part], 2),
        )
    };
    let part = |data: &str, format: &str| json!({"type": "input_audio", "input_audio": {"data": data, "format": format}});
    let cases = [
        (part("@@not base64@@", "wav"), "not valid base64"),
        (part("", "wav"), "empty"),
        (
            part(&b64(b"hello, this is not audio"), "wav"),
            "not a supported audio file",
        ),
        (part(&b64(&wav_bytes[..3000]), "wav"), "truncated"),
        (part(&b64(&wav_bytes[..40]), "wav"), "not usable audio"),
        (part(&b64(&wav_bytes), "aiff"), "format is \"aiff\""),
        (part(&data_url("image/png", &wav_bytes), "wav"), "not audio"),
    ];
    for (p, words) in cases {
        assert_error(&ask(p), 400, words, Some(param));
    }
    assert_error(
        &ask(json!({"type": "input_audio"})),
        400,
        "without an input_audio object",
        Some(param),
    );
    let body = json!({"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [audio_part(&wav_bytes, "wav")]},
    ]});
    assert_error(
        &post(addr, "/v1/chat/completions", &body),
        400,
        "audio parts go in user messages",
        Some("messages[1].content[0].input_audio"),
    );
    assert_error(
        &post(
            addr,
            "/v1/chat/completions",
            &chat_body("a <audio_soft_token> b", 2),
        ),
        400,
        "stands for audio",
        Some("messages[0].content"),
    );
    // The server is still fine.
    let r = post(
        addr,
        "/v1/chat/completions",
        &parts_body(vec![audio_part(&wav_bytes, "wav")], 2),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn bad_transcription_requests_are_400s() {
    let addr = server();
    let path = "/v1/audio/transcriptions";
    let file = clip("speech_16k_mono.wav");
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut fields = vec![("file", Field::File("a.wav", &file))];
        fields.extend(extra.iter().map(|(k, v)| (*k, Field::Text(v))));
        post_form(addr, path, &fields)
    };
    assert_error(
        &post_form(addr, path, &[("model", Field::Text("gemma"))]),
        400,
        "no file",
        Some("file"),
    );
    assert_error(
        &with(&[("response_format", "diarized_json")]),
        400,
        "not supported",
        Some("response_format"),
    );
    assert_error(
        &with(&[("temperature", "warm")]),
        400,
        "not a number",
        Some("temperature"),
    );
    assert_error(
        &with(&[("temperature", "5")]),
        400,
        "between 0 and 2",
        Some("temperature"),
    );
    assert_error(
        &with(&[("stream", "maybe")]),
        400,
        "true or false",
        Some("stream"),
    );
    assert_error(
        &with(&[("stream", "true"), ("response_format", "verbose_json")]),
        400,
        "json or",
        Some("response_format"),
    );
    assert_error(
        &with(&[("timestamp_granularities[]", "word")]),
        400,
        "not supported",
        Some("timestamp_granularities"),
    );
    assert_error(
        &with(&[("prompt", "<audio_soft_token>")]),
        400,
        "stands for audio",
        Some("prompt"),
    );
    for (bytes, words) in [
        (&b""[..], "empty"),
        (&b"not audio at all"[..], "not a supported audio file"),
        (&file[..2000], "truncated"),
    ] {
        assert_error(
            &post_form(addr, path, &[("file", Field::File("a.wav", bytes))]),
            400,
            words,
            Some("file"),
        );
    }
    let two = post_form(
        addr,
        path,
        &[
            ("file", Field::File("a.wav", &file)),
            ("file", Field::File("b.wav", &file)),
        ],
    );
    assert_error(&two, 400, "more than one file", Some("file"));
    // Not a form at all.
    assert_error(
        &post(addr, path, &json!({"file": "x"})),
        400,
        "multipart/form-data",
        None,
    );
    let r = request_typed(
        addr,
        "POST",
        path,
        "multipart/form-data; boundary=xyz",
        Some(b"--xyz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc"),
    );
    assert_error(&r, 400, "multipart", None);
}

/// A form over the body limit is a 413, whether its length is announced or found while
/// reading a chunked body.
#[test]
fn forms_over_the_body_limit_are_413s() {
    let server = start(ServerConfig {
        body_limit: 64 * 1024,
        ..config(1)
    });
    let path = "/v1/audio/transcriptions";
    let big = vec![0u8; 100 * 1024];
    let r = post_form(server.addr, path, &[("file", Field::File("big.wav", &big))]);
    assert_error(&r, 413, "larger than", None);
    let boundary = "b0undary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
    )
    .into_bytes();
    body.extend(&big);
    body.extend(format!("\r\n--{boundary}--\r\n").as_bytes());
    let mut stream = connect(server.addr);
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: \
         multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        body.len()
    );
    use std::io::Write as _;
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer before it has read everything.
    let _ = stream
        .write_all(&body)
        .and_then(|()| stream.write_all(b"\r\n0\r\n\r\n"));
    let mut reader = std::io::BufReader::new(stream);
    let (status, _) = read_head(&mut reader);
    assert_eq!(status, 413);
    server.stop().unwrap();
}

#[test]
fn too_long_audio_is_refused_with_the_limit() {
    let server = start(ServerConfig {
        media: MediaConfig {
            audio_limits: AudioLimits {
                max_seconds: 1.5,
                ..AudioLimits::default()
            },
            ..MediaConfig::default()
        },
        ..config(1)
    });
    let file = clip("speech_16k_mono.wav");
    let r = post_form(
        server.addr,
        "/v1/audio/transcriptions",
        &[("file", Field::File("a.wav", &file))],
    );
    assert_error(&r, 400, "--max-audio-seconds", Some("file"));
    let r = post(
        server.addr,
        "/v1/chat/completions",
        &parts_body(vec![audio_part(&file, "wav")], 2),
    );
    assert_error(
        &r,
        400,
        "--max-audio-seconds",
        Some("messages[0].content[0].input_audio"),
    );
    // A shorter clip passes.
    let r = post(
        server.addr,
        "/v1/chat/completions",
        &parts_body(vec![audio_part(&clip("clipping_16k_mono.wav"), "wav")], 2),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    server.stop().unwrap();
}

#[test]
fn audio_for_a_model_without_an_audio_tower_is_a_400() {
    let server = start_vision_server(ServerConfig {
        parallel: 1,
        ctx_size: 256,
        ..ServerConfig::default()
    });
    let file = clip("speech_16k_mono.wav");
    let r = post(
        server.addr,
        "/v1/chat/completions",
        &parts_body(vec![text_part("Hear this:"), audio_part(&file, "wav")], 2),
    );
    assert_error(
        &r,
        400,
        "takes no audio",
        Some("messages[0].content[1].input_audio"),
    );
    assert_eq!(r.json()["error"]["code"], "audio_not_supported");
    for path in ["/v1/audio/transcriptions", "/v1/audio/translations"] {
        let r = post_form(server.addr, path, &[("file", Field::File("a.wav", &file))]);
        assert_error(&r, 400, "takes no audio", Some("file"));
    }
    server.stop().unwrap();
}

/// The official `openai` Python client (`scripts/openai_audio_check.py`): transcriptions in
/// each format and streamed, a translation, chat requests with `input_audio` (WAV and MP3,
/// plain and streamed, the reference's greedy text), and bad audio.
#[test]
fn official_openai_client_hears() {
    let server = start(config(2));
    run_client_script(
        "openai_audio_check.py",
        &[
            format!("http://{}/v1", server.addr),
            root().join("fixtures/audio").display().to_string(),
            model_dir().join("reference.json").display().to_string(),
        ],
    );
    server.stop().unwrap();
}
