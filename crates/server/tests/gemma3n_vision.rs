//! Gemma 3n images and audio through the server (fixtures/gemma3n_vision_tiny, from
//! transformers): one chat message holding an image and an audio clip between text parts is
//! the reference processor's prompt (same ids) and answers with the reference's greedy first
//! token; the official `openai` client does the same (scripts/openai_vision_audio_check.py); a
//! broken image is a 400.

mod common;

use std::path::PathBuf;

use common::*;
use gemma_server::{RunningServer, ServerConfig};
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir() -> PathBuf {
    root().join("fixtures/gemma3n_vision_tiny")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(model_dir().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn start() -> RunningServer {
    std::env::set_var("GEMMA_THREADS", "1");
    let loaded = gemma_engine::load(Some(&model_dir()), &Default::default()).unwrap();
    let config = ServerConfig {
        port: 0,
        parallel: 2,
        ctx_size: 1024,
        queue_capacity: 16,
        body_limit: 8 * 1024 * 1024,
        ..ServerConfig::default()
    };
    gemma_server::start(loaded, config).expect("the server starts")
}

fn audio_part(rel: &str) -> Value {
    use base64::Engine as _;
    let bytes = std::fs::read(root().join("fixtures").join(rel)).unwrap();
    json!({"type": "input_audio", "input_audio": {
        "data": base64::engine::general_purpose::STANDARD.encode(bytes), "format": "wav"}})
}

#[test]
fn one_message_with_an_image_and_audio() {
    let server = start();
    let r = reference();
    let p = &r["prompts"]["image_audio_text"];
    let png = std::fs::read(root().join("fixtures/images/rgb_300x200.png")).unwrap();
    let body = parts_body(
        vec![
            image_part(&data_url("image/png", &png)),
            text_part("What is said in this recording?"),
            audio_part("audio/speech_16k_mono.wav"),
            text_part("Who is speaking?"),
        ],
        1,
    );
    let resp = post(server.addr, "/v1/chat/completions", &body);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let json = resp.json();
    assert_eq!(
        json["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        p["input_ids"].as_array().unwrap().len()
    );
    // A broken image is a 400 naming the part.
    let bad = parts_body(
        vec![
            image_part("data:image/png;base64,iVBORw0KGgo="),
            text_part("Hi"),
        ],
        1,
    );
    let resp = post(server.addr, "/v1/chat/completions", &bad);
    assert_eq!(resp.status, 400, "{}", resp.text());
    assert!(resp.text().contains("image_url"), "{}", resp.text());
    server.stop().unwrap();
}

/// The official `openai` Python client: an image and an audio clip in one message (plain,
/// streamed, both orders) and through the Responses API.
#[test]
fn official_openai_client_sees_and_hears() {
    let server = start();
    run_client_script(
        "openai_vision_audio_check.py",
        &[
            format!("http://{}/v1", server.addr),
            root().join("fixtures").display().to_string(),
            model_dir().join("reference.json").display().to_string(),
        ],
    );
    server.stop().unwrap();
}
