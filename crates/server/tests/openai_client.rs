//! The server driven by the official `openai` Python client: `scripts/openai_client_check.py`
//! (chat, streaming, a tool call round trip, streamed tool calls, 20 random `json_schema`
//! outputs validated with `jsonschema`, and `chat.completions.parse()` with unbounded pydantic
//! models) against the real server with the real default model, and image requests (one
//! image, two in a message, streamed, pan-and-scan, bad images) against a second server with
//! the tiny Gemma 3 vision model of `fixtures/gemma3_vision_tiny/`.
//!
//! The client lives in a virtual environment under the model cache
//! (`<cache>/venvs/openai-client`), made with `python3 -m venv` and `pip install openai
//! jsonschema ollama` on first use, like the default model is fetched on first use
//! ([`common::client_venv`]).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use gemma_server::ServerConfig;

#[test]
fn official_openai_client_passes_every_check() {
    let python = client_venv();
    let server = start_server_with_context(2, 16, 2048);
    let vision = start_vision_server(ServerConfig {
        parallel: 2,
        ctx_size: 512,
        ..ServerConfig::default()
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/openai_client_check.py");
    let images = vision_model_dir().join("..");
    let output = Command::new(&python)
        .arg(&script)
        .arg(format!("http://{}/v1", server.addr))
        .arg(format!("http://{}/v1", vision.addr))
        .arg(&images)
        .output()
        .expect("the client script runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        output.status.success(),
        "the openai client script failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    server.stop().expect("the server stops");
    vision.stop().expect("the vision server stops");
}
