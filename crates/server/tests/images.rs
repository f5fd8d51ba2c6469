//! Images in chat requests, against the tiny random Gemma 3 vision model of
//! `fixtures/gemma3_vision_tiny/`: greedy answers equal the engine's own in-process generation
//! for the same prompt and images, streaming equals non-streaming, the prefix cache tells
//! images apart, and every bad input is a 400 naming the offending part.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use gemma_engine::gemma_tokenizer::ChatMessage;
use gemma_engine::{ImageOptions, LoadedModel, SamplingParams, Session};
use gemma_server::{MediaConfig, RunningServer, ServerConfig};
use serde_json::{json, Value};

const CTX: usize = 512;
const MAX_IMAGES: usize = 6;

const IMG_A: &str = "img_a_97x73.png";
const IMG_B: &str = "img_b1_64x64.png";
const IMG_TALL: &str = "img_b2_40x120.png";
const IMG_WIDE: &str = "img_c_800x300.png";

/// The directory the shared server may read images from: a copy of one fixture image, and a
/// symlink that points out of it.
fn media_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("server-media");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/a.png"), fixture_image(IMG_A)).unwrap();
        let outside = vision_model_dir()
            .join("../")
            .join(IMG_B)
            .canonicalize()
            .unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(outside, dir.join("escape.png")).unwrap();
        dir
    })
}

fn config(ctx_size: usize, parallel: usize) -> ServerConfig {
    ServerConfig {
        parallel,
        ctx_size,
        queue_capacity: 16,
        body_limit: 4 * 1024 * 1024,
        media: MediaConfig {
            allowed_dir: Some(media_dir().to_path_buf()),
            max_images: MAX_IMAGES,
            ..MediaConfig::default()
        },
        ..ServerConfig::default()
    }
}

fn server() -> SocketAddr {
    static SERVER: OnceLock<RunningServer> = OnceLock::new();
    SERVER
        .get_or_init(|| start_vision_server(config(CTX, 2)))
        .addr
}

/// An independent copy of the model: the engine's own answers.
fn reference() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(load_vision_model)
}

fn png_url(name: &str) -> String {
    data_url("image/png", &fixture_image(name))
}

/// What the engine generates in-process (greedy) for a conversation whose messages hold one
/// image marker per image: the text, the prompt length and the generated count.
fn engine_answer(
    messages: &[ChatMessage],
    images: &[&str],
    pan_and_scan: bool,
    max_tokens: usize,
) -> (String, usize, usize) {
    let model = reference();
    let rendered = model.render_chat(None, messages).unwrap();
    let opts = ImageOptions {
        pan_and_scan,
        ..ImageOptions::default()
    };
    let prepared: Vec<_> = images
        .iter()
        .map(|name| model.prepare_image(&fixture_image(name), &opts).unwrap())
        .collect();
    let (ids, soft) = model.encode_with_images(&rendered, &prepared).unwrap();
    let mut session = Session::new(model, CTX).unwrap();
    let params = SamplingParams {
        max_tokens,
        ..SamplingParams::greedy()
    };
    let mut text = String::new();
    let stats = session
        .generate_with(&ids, &soft, &params, &mut |t| {
            text.push_str(t);
            true
        })
        .unwrap();
    (text, ids.len(), stats.generated_tokens)
}

const MARKER: &str = gemma_engine::vision::IMAGE_MARKER;

fn content(v: &Value) -> &str {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {v}"))
}

fn assert_matches_engine(v: &Value, expected: &(String, usize, usize)) {
    assert_eq!(content(v), expected.0, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], expected.1, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], expected.2, "{v}");
}

#[test]
fn an_image_answer_equals_the_engine_in_process() {
    let body = parts_body(
        vec![
            text_part("What is in this picture?"),
            image_part(&png_url(IMG_A)),
        ],
        12,
    );
    let r = post(server(), "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    let expected = engine_answer(
        &[ChatMessage::new(
            "user",
            format!("What is in this picture?{MARKER}"),
        )],
        &[IMG_A],
        false,
        12,
    );
    assert!(expected.1 > 16, "the prompt holds the image's 16 tokens");
    assert_matches_engine(&v, &expected);
}

/// Text before the images: with it the prompt is several prefill chunks long.
const LONG_TEXT: &str = "You are a careful observer of small pictures. Look at every colour, \
    every edge and every shape, then answer in a few words. Pictures may be tiny, noisy or \
    oddly shaped; say what you see anyway, and do not apologise.";

/// The server feeds prompts in 64-token chunks; a chunk that would end inside an image block
/// stops before it, and the block is fed whole. The answer equals the engine's, which feeds
/// the whole prompt at once.
#[test]
fn a_long_prompt_is_chunked_around_its_images() {
    let model = reference();
    let image = model
        .prepare_image(&fixture_image(IMG_B), &ImageOptions::default())
        .unwrap();
    // Pad the text until the first image straddles position 128, the end of the second chunk.
    let text = (0..64)
        .map(|k| format!("{LONG_TEXT}{}", " ok".repeat(k)))
        .find(|text| {
            let message = ChatMessage::new("user", format!("{text}{MARKER}"));
            let rendered = model.render_chat(None, &[message]).unwrap();
            let (_, soft) = model
                .encode_with_images(&rendered, std::slice::from_ref(&image))
                .unwrap();
            let r = soft[0].range(model.model.hidden_size());
            r.start < 128 && 128 < r.end
        })
        .expect("some padding puts the image across position 128");
    let body = parts_body(
        vec![
            text_part(&text),
            image_part(&png_url(IMG_B)),
            text_part(LONG_TEXT),
            image_part(&png_url(IMG_A)),
            text_part("What are they?"),
        ],
        8,
    );
    let mut body = body;
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(5);
    let v = post(server(), "/v1/chat/completions", &body).json();
    let messages = [ChatMessage::new(
        "user",
        format!("{text}{MARKER}{LONG_TEXT}{MARKER}What are they?"),
    )];
    assert_matches_engine(&v, &engine_answer(&messages, &[IMG_B, IMG_A], false, 8));
    // The first token's distribution too: an image block cut in two (its halves not seeing
    // each other) moves these by about 1e-2 without changing the greedy text.
    let mut engine = engine_logprobs(&messages, &[IMG_B, IMG_A]);
    engine.sort_by(|a, b| b.total_cmp(a));
    let served: Vec<f64> = v["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap())
        .collect();
    assert_eq!(served.len(), 5);
    for (s, e) in served.iter().zip(&engine) {
        assert!(
            (s - *e as f64).abs() < 1e-3,
            "top log-probabilities {served:?}, the engine's {:?}",
            &engine[..5]
        );
    }
}

/// The engine's log-probabilities for the token after a conversation's prompt.
fn engine_logprobs(messages: &[ChatMessage], images: &[&str]) -> Vec<f32> {
    let model = reference();
    let rendered = model.render_chat(None, messages).unwrap();
    let prepared: Vec<_> = images
        .iter()
        .map(|name| {
            model
                .prepare_image(&fixture_image(name), &ImageOptions::default())
                .unwrap()
        })
        .collect();
    let (ids, soft) = model.encode_with_images(&rendered, &prepared).unwrap();
    let mut session = Session::new(model, CTX).unwrap();
    let logits = session.evaluate(&ids, &soft).unwrap();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_sum = max + sum.ln() as f32;
    logits.iter().map(|&l| l - log_sum).collect()
}

/// Ollama's `/api/chat` and `/api/generate` take images as bare base64 in `images`: they go
/// before the message's text, and the answer equals the engine's for that prompt.
#[test]
fn ollama_base64_images_equal_the_engine_in_process() {
    let b64 = png_url(IMG_A)
        .split_once(',')
        .map(|(_, data)| data.to_string())
        .unwrap();
    let expected = engine_answer(
        &[ChatMessage::new("user", format!("{MARKER}What is this?"))],
        &[IMG_A],
        false,
        10,
    );
    let tags = request(server(), "GET", "/api/tags", None).json();
    let name = tags["models"][0]["name"].as_str().unwrap().to_string();
    let chat = json!({
        "model": name, "stream": false, "options": {"temperature": 0, "num_predict": 10},
        "messages": [{"role": "user", "content": "What is this?", "images": [b64]}],
    });
    let r = post(server(), "/api/chat", &chat);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["message"]["content"], expected.0.as_str(), "{v}");
    assert_eq!(v["prompt_eval_count"], expected.1, "{v}");
    assert_eq!(v["eval_count"], expected.2, "{v}");
    let generate = json!({
        "model": name, "stream": false, "options": {"temperature": 0, "num_predict": 10},
        "prompt": "What is this?", "images": [b64],
    });
    let v = post(server(), "/api/generate", &generate).json();
    assert_eq!(v["response"], expected.0.as_str(), "{v}");
    // Not base64, or not an image: a 400 in Ollama's shape.
    let mut bad = chat.clone();
    bad["messages"][0]["images"] = json!(["not base64!"]);
    let r = post(server(), "/api/chat", &bad);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"].is_string(), "{}", r.text());
}

#[test]
fn two_images_in_one_message_equal_the_engine_in_process() {
    let body = parts_body(
        vec![
            image_part(&png_url(IMG_A)),
            text_part("Compare this one with"),
            image_part(&png_url(IMG_TALL)),
            text_part("this one."),
        ],
        10,
    );
    let v = post(server(), "/v1/chat/completions", &body).json();
    let expected = engine_answer(
        &[ChatMessage::new(
            "user",
            format!("{MARKER}Compare this one with{MARKER}this one."),
        )],
        &[IMG_A, IMG_TALL],
        false,
        10,
    );
    assert_matches_engine(&v, &expected);
}

#[test]
fn images_in_several_user_messages_equal_the_engine_in_process() {
    let body = json!({
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [image_part(&png_url(IMG_B)), text_part("And this?")]},
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": [
                text_part("Now this:"), {"type": "image_url", "image_url": png_url(IMG_A)},
            ]},
        ],
        "max_tokens": 8,
        "temperature": 0,
    });
    let v = post(server(), "/v1/chat/completions", &body).json();
    let expected = engine_answer(
        &[
            ChatMessage::new("system", "Answer briefly."),
            ChatMessage::new("user", format!("{MARKER}And this?")),
            ChatMessage::new("assistant", "A square."),
            ChatMessage::new("user", format!("Now this:{MARKER}")),
        ],
        &[IMG_B, IMG_A],
        false,
        8,
    );
    assert_matches_engine(&v, &expected);
}

#[test]
fn pan_and_scan_adds_the_crops() {
    let parts = vec![image_part(&png_url(IMG_WIDE)), text_part("Describe it.")];
    let mut body = parts_body(parts, 6);
    let plain = post(server(), "/v1/chat/completions", &body).json();
    body["pan_and_scan"] = json!(true);
    let v = post(server(), "/v1/chat/completions", &body).json();
    let messages = [ChatMessage::new("user", format!("{MARKER}Describe it."))];
    let expected = engine_answer(&messages, &[IMG_WIDE], true, 6);
    assert_matches_engine(&v, &expected);
    // 800x300: the original and 3 crops, 16 tokens each, and the reference's sentence.
    let plain_tokens = plain["usage"]["prompt_tokens"].as_u64().unwrap();
    let crop_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(crop_tokens >= plain_tokens + 3 * 16, "{plain} {v}");
}

#[test]
fn a_streamed_image_request_equals_the_non_streamed_one() {
    let mut body = parts_body(
        vec![
            text_part("Tell me about"),
            image_part(&png_url(IMG_A)),
            text_part("and"),
            image_part(&png_url(IMG_B)),
        ],
        12,
    );
    let full = post(server(), "/v1/chat/completions", &body).json();
    body["stream_options"] = json!({"include_usage": true});
    let chunks = post_stream(server(), &body);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(streamed_content(&chunks), content(&full));
    assert_eq!(chunks.last().unwrap()["usage"], full["usage"]);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        full["choices"][0]["finish_reason"]
    );
}

#[test]
fn local_files_are_read_only_under_the_allowed_dir() {
    let addr = server();
    let dir = media_dir();
    let ask = |url: String| {
        post(
            addr,
            "/v1/chat/completions",
            &parts_body(vec![image_part(&url), text_part("What is it?")], 6),
        )
    };
    let expected = ask(png_url(IMG_A)).json();
    let inside = [
        "sub/a.png".to_string(),
        dir.join("sub/a.png").display().to_string(),
        format!("file://{}", dir.join("sub/a.png").display()),
        format!("file://{}", dir.join("sub/../sub/a.png").display()),
    ];
    for url in inside {
        let r = ask(url.clone());
        assert_eq!(r.status, 200, "{url}: {}", r.text());
        assert_eq!(content(&r.json()), content(&expected), "{url}");
    }
    let outside = vision_model_dir().join("..").join(IMG_A);
    // Outside the directory, existing or not, is one answer: nothing leaks about the server's
    // other files.
    let not_here = "is not a file in the directory this server reads images from";
    let refused = [
        ("../a.png".to_string(), not_here),
        ("sub/../../a.png".to_string(), not_here),
        (outside.display().to_string(), not_here),
        (format!("file://{}", outside.display()), not_here),
        ("escape.png".to_string(), not_here),
        ("/etc/passwd".to_string(), not_here),
        ("missing.png".to_string(), not_here),
        ("sub".to_string(), "not a regular file"),
        (
            "file://example.com/a.png".to_string(),
            "local absolute path",
        ),
    ];
    for (url, words) in refused {
        let r = ask(url.clone());
        assert_eq!(r.status, 400, "{url}: {}", r.text());
        let e = &r.json()["error"];
        assert!(e["message"].as_str().unwrap().contains(words), "{url}: {e}");
        assert_eq!(e["param"], "messages[0].content[0].image_url", "{url}");
    }
}

/// A PNG whose header says `w`×`h` (grey, `bit_depth`), with `idat` as its compressed data.
fn png_with_header(w: u32, h: u32, bit_depth: u8, idat: &[u8]) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, 0, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// A zlib stream of `n` zero bytes, compressed piece by piece.
fn zlib_zeros(n: u64) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        enc.write_all(&chunk[..k]).unwrap();
        left -= k as u64;
    }
    enc.finish().unwrap()
}

/// Posts `body` and checks for a 400 in OpenAI's error shape whose message holds `words` and
/// whose `param` is `param`.
#[track_caller]
fn assert_refused(addr: SocketAddr, what: &str, body: &Value, words: &str, param: &str) {
    let r = post(addr, "/v1/chat/completions", body);
    assert_eq!(r.status, 400, "{what}: {}", r.text());
    let e = &r.json()["error"];
    assert_eq!(e["type"], "invalid_request_error", "{what}: {e}");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.to_lowercase().contains(&words.to_lowercase()),
        "{what}: {message:?} lacks {words:?}"
    );
    assert_eq!(e["param"], param, "{what}: {e}");
}

#[test]
fn bad_images_are_400s_naming_the_part() {
    let addr = server();
    let png = fixture_image(IMG_A);
    let huge_header = png_with_header(50_000, 50_000, 8, &[]);
    // 20000x20000 1-bit grey: ~50 KB that inflate to 50 MB (400 MB as 8-bit pixels).
    let bomb = png_with_header(20_000, 20_000, 1, &zlib_zeros(20_000 * (20_000 / 8 + 1)));
    assert!(bomb.len() < 200_000);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "truncated",
            data_url("image/png", &png[..png.len() / 2]),
            "corrupt or truncated",
        ),
        (
            "corrupt",
            data_url("image/png", &png[..40].repeat(3)),
            "not a usable image",
        ),
        (
            "not an image",
            data_url("image/png", b"hello"),
            "not a supported image",
        ),
        ("empty", data_url("image/png", b""), "not a usable image"),
        (
            "50000x50000 header",
            data_url("image/png", &huge_header),
            "50000x50000",
        ),
        ("zip bomb", data_url("image/png", &bomb), "20000x20000"),
        (
            "bad base64",
            "data:image/png;base64,iVBORw0K!!!not base64".into(),
            "invalid base64",
        ),
        (
            "not base64",
            "data:image/png,rawbytes".into(),
            "not base64-encoded",
        ),
        ("no comma", "data:image/png;base64".into(), "no ','"),
        (
            "not an image type",
            "data:text/plain;base64,aGVsbG8=".into(),
            "not an image",
        ),
        (
            "http",
            "http://example.com/cat.png".into(),
            "remote image URLs are not fetched",
        ),
        (
            "https",
            "https://example.com/cat.png".into(),
            "send the image as a data: URL",
        ),
        ("ftp", "ftp://example.com/cat.png".into(), "not fetched"),
        ("empty URL", "".into(), "empty"),
    ];
    for (what, url, words) in &cases {
        let body = parts_body(vec![text_part("Look:"), image_part(url)], 4);
        assert_refused(addr, what, &body, words, "messages[0].content[1].image_url");
    }
    // The second image of the second user message is named.
    let body = json!({
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": [image_part(&png_url(IMG_A)), image_part(&cases[0].1)]},
        ],
        "max_tokens": 4,
    });
    assert_refused(
        addr,
        "second image",
        &body,
        "corrupt",
        "messages[2].content[1].image_url",
    );
    // Malformed parts.
    let body = parts_body(vec![json!({"type": "image_url"})], 4);
    assert_refused(
        addr,
        "no image_url",
        &body,
        "without an image_url",
        "messages[0].content[0].image_url",
    );
    let body = json!({"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [image_part(&png_url(IMG_A))]},
        {"role": "user", "content": "What did you show me?"},
    ]});
    assert_refused(
        addr,
        "assistant image",
        &body,
        "images go in user messages",
        "messages[1].content[0].image_url",
    );
    let body = chat_body(&format!("Here {MARKER} is a marker."), 4);
    assert_refused(
        addr,
        "literal marker",
        &body,
        "image_url content parts",
        "messages[0].content",
    );
    // The server is still fine.
    let r = post(
        addr,
        "/v1/chat/completions",
        &parts_body(vec![image_part(&png_url(IMG_A))], 2),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn too_many_images_are_refused_crops_counted() {
    let addr = server();
    let url = png_url(IMG_B);
    let parts = vec![image_part(&url); MAX_IMAGES + 1];
    assert_refused(
        addr,
        "too many",
        &parts_body(parts, 4),
        &format!("at most {MAX_IMAGES}"),
        "messages",
    );
    // Two wide images are within the limit, but with pan-and-scan each is 4 views.
    let mut body = parts_body(vec![image_part(&png_url(IMG_WIDE)); 2], 4);
    let r = post(addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    body["pan_and_scan"] = json!(true);
    assert_refused(addr, "crops", &body, "pan-and-scan crops", "messages");
}

#[test]
fn images_that_do_not_fit_the_context_are_refused() {
    // 64 positions: two images (2 × 20 tokens) and the text fit, three do not.
    let server = start_vision_server(config(64, 1));
    let url = png_url(IMG_B);
    let r = post(
        server.addr,
        "/v1/chat/completions",
        &parts_body(vec![image_part(&url), image_part(&url)], 2),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let body = parts_body(vec![image_part(&url); 3], 2);
    assert_refused(
        server.addr,
        "context",
        &body,
        "context size is 64",
        "messages",
    );
    let r = post(server.addr, "/v1/chat/completions", &body);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    server.stop().unwrap();
}

/// The prefix cache compares what the positions hold, not their ids: every image sits on the
/// same placeholder ids, so an ids-only cache would answer image B with image A's keys.
#[test]
fn the_prefix_cache_never_reuses_another_images_keys() {
    let server = start_vision_server(config(CTX, 1));
    let addr = server.addr;
    // One token, with its distribution: with the whole prompt but its last token cached (the
    // only reuse the tiny model's 8-token sliding window allows), an ids-only cache would
    // compute B's answer from A's image.
    let ask = |image: &str| {
        let mut body = parts_body(
            vec![text_part("What is this?"), image_part(&png_url(image))],
            1,
        );
        body["logprobs"] = json!(true);
        body["top_logprobs"] = json!(5);
        let r = post(addr, "/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let hits = || metric(addr, "gemma_prefix_cache_hit_tokens_total");
    let answer = |v: &Value| {
        (
            v["choices"][0]["message"]["content"].clone(),
            v["choices"][0]["logprobs"].clone(),
        )
    };

    let a = ask(IMG_A);
    let before = hits();
    // The same image again: everything but the last prompt token comes from the cache, and
    // the answer is the same to the bit.
    let a_again = ask(IMG_A);
    let prompt_tokens = a["usage"]["prompt_tokens"].as_f64().unwrap();
    assert_eq!(hits() - before, prompt_tokens - 1.0);
    assert_eq!(answer(&a_again), answer(&a));

    // Another image after A: nothing of A's image is reused ...
    let before = hits();
    let b_after_a = ask(IMG_B);
    assert_eq!(hits(), before, "B reused A's cache");
    // ... and the answer is that of B on a cold slot.
    post(
        addr,
        "/v1/chat/completions",
        &chat_body("Something else.", 1),
    );
    let before = hits();
    let b_cold = ask(IMG_B);
    assert_eq!(hits(), before);
    assert_eq!(answer(&b_after_a), answer(&b_cold));
    // The two images do give different answers, so the comparison above can fail.
    assert_ne!(answer(&a).1, answer(&b_cold).1);
    server.stop().unwrap();
}

#[test]
fn a_text_only_model_refuses_images() {
    let server = start_server(1, 4);
    let body = parts_body(vec![text_part("Look:"), image_part(&png_url(IMG_A))], 4);
    assert_refused(
        server.addr,
        "text-only model",
        &body,
        "takes no images",
        "messages[0].content[1].image_url",
    );
    // Text parts alone are still answered, and the marker is plain text to a text model.
    let r = post(
        server.addr,
        "/v1/chat/completions",
        &parts_body(vec![text_part("Say hi.")], 2),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    server.stop().unwrap();
}

/// Each image case of the fixture's `reference.json` (one image, three images in one message,
/// pan-and-scan, text after an image), sent to the server as a greedy one-token request with
/// the top 5 log-probabilities: (name, case, response).
fn reference_cases() -> Vec<(String, Value, Value)> {
    let dir = vision_model_dir().join("..");
    let reference: Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for case in reference["cases"].as_array().unwrap() {
        let images: Vec<&str> = case["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_str().unwrap())
            .collect();
        if images.is_empty() {
            continue;
        }
        let name = case["name"].as_str().unwrap();
        // The user text of the rendered prompt, its image slots turned back into parts.
        let prompt = case["prompt"].as_str().unwrap();
        let user = prompt
            .strip_prefix("<bos><start_of_turn>user\n")
            .and_then(|p| p.strip_suffix("<end_of_turn>\n<start_of_turn>model\n"))
            .unwrap_or_else(|| panic!("{name}: unexpected prompt {prompt:?}"));
        let mut parts = Vec::new();
        for (i, text) in user.split(MARKER).enumerate() {
            if i > 0 {
                parts.push(image_part(&png_url(images[i - 1])));
            }
            if !text.is_empty() {
                parts.push(text_part(text));
            }
        }
        let mut body = parts_body(parts, 1);
        body["pan_and_scan"] = case["pan_and_scan"].clone();
        body["logprobs"] = json!(true);
        body["top_logprobs"] = json!(5);
        let r = post(server(), "/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        out.push((name.to_owned(), case.clone(), r.json()));
    }
    assert!(out.len() >= 4, "{} image cases", out.len());
    out
}

/// The prompts the server builds from content parts have the reference processor's length
/// (images expanded as transformers' `Gemma3Processor` does, pan-and-scan crops included).
#[test]
fn prompts_have_the_reference_processors_token_counts() {
    for (name, case, v) in reference_cases() {
        assert_eq!(
            v["usage"]["prompt_tokens"],
            case["input_ids"].as_array().unwrap().len(),
            "{name}"
        );
    }
}

/// The first token's top log-probabilities equal those of transformers' logits at the last
/// prompt position.
#[test]
fn first_token_log_probabilities_match_transformers() {
    let dir = vision_model_dir().join("..");
    for (name, case, v) in reference_cases() {
        let file = dir.join(case["logits"]["file"].as_str().unwrap());
        let logits: Vec<f32> = std::fs::read(&file)
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let vocab = case["logits"]["shape"][1].as_u64().unwrap() as usize;
        let last = &logits[logits.len() - vocab..];
        let max = last.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = max as f64
            + last
                .iter()
                .map(|&l| ((l - max) as f64).exp())
                .sum::<f64>()
                .ln();
        let mut expected: Vec<f64> = last.iter().map(|&l| l as f64 - log_sum).collect();
        expected.sort_by(|a, b| b.total_cmp(a));
        let served: Vec<f64> = v["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["logprob"].as_f64().unwrap())
            .collect();
        // The server's KV cache is f16; transformers ran in f32.
        for (s, e) in served.iter().zip(&expected) {
            assert!(
                (s - e).abs() < 5e-3,
                "{name}: top log-probabilities {served:?}, transformers' {:?}",
                &expected[..5]
            );
        }
    }
}
