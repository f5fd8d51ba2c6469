//! Ollama's API (`/api/chat`, `/api/generate`, `/api/tags`, `/api/show`, `/api/ps`,
//! `/api/version`, `/`) with the real default model: the official `ollama` Python client
//! (`scripts/ollama_client_check.py`, in the client venv of [`common::client_venv`]) and raw
//! HTTP checks of the shapes: NDJSON streams, the final object's counts and durations, and
//! `{"error": ...}` errors with their statuses.

mod common;

use common::*;
use serde_json::{json, Value};

#[test]
fn official_ollama_client_passes_every_check() {
    let server = start_server_with_context(2, 16, 2048);
    run_client_script(
        "ollama_client_check.py",
        &[format!("http://{}", server.addr)],
    );
    server.stop().expect("the server stops");
}

fn model_name(addr: std::net::SocketAddr) -> String {
    let tags = request(addr, "GET", "/api/tags", None);
    assert_eq!(tags.status, 200, "{}", tags.text());
    let tags = tags.json();
    assert_eq!(tags["models"].as_array().unwrap().len(), 1, "{tags}");
    let name = tags["models"][0]["name"].as_str().unwrap().to_owned();
    assert!(name.ends_with(":latest"), "{name}");
    assert_eq!(tags["models"][0]["details"]["format"], "gguf");
    name
}

/// Checks the final object: `done: true`, a reason, integer durations > 0.
fn check_final(last: &Value) {
    assert_eq!(last["done"], true, "{last}");
    assert!(
        ["stop", "length"].contains(&last["done_reason"].as_str().unwrap()),
        "{last}"
    );
    for key in [
        "total_duration",
        "load_duration",
        "prompt_eval_duration",
        "eval_duration",
    ] {
        let value = last[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} is not an integer: {last}"));
        assert!(value > 0, "{key} is 0: {last}");
    }
    assert!(
        last["total_duration"].as_u64() >= last["eval_duration"].as_u64(),
        "{last}"
    );
    let created = last["created_at"].as_str().unwrap();
    assert!(
        created.len() == 30 && created.ends_with('Z') && created.as_bytes()[19] == b'.',
        "created_at {created:?} is not RFC 3339 with nanoseconds"
    );
}

#[test]
fn chat_streams_ndjson_that_matches_the_openai_endpoint() {
    let server = start_server(1, 8);
    let model = model_name(server.addr);
    let messages = json!([{"role": "user", "content": "Name three colors."}]);
    let r = post(
        server.addr,
        "/api/chat",
        &json!({"model": model, "messages": messages,
                "options": {"temperature": 0, "num_predict": 10, "unknown_option": 1}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let lines = ndjson_lines(&r);
    assert!(lines.len() >= 2, "{lines:?}");
    let done: Vec<bool> = lines.iter().map(|l| l["done"] == true).collect();
    assert_eq!(done.iter().filter(|d| **d).count(), 1, "{lines:?}");
    assert!(done.last().unwrap(), "the done object comes last");
    for line in &lines {
        assert_eq!(line["model"], model.as_str());
        assert_eq!(line["message"]["role"], "assistant");
    }
    let last = lines.last().unwrap();
    check_final(last);
    let content: String = lines
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap())
        .collect();

    // The same request through the OpenAI endpoint: same text, same counts.
    let openai = post(
        server.addr,
        "/v1/chat/completions",
        &json!({"messages": messages, "temperature": 0, "max_tokens": 10}),
    )
    .json();
    assert_eq!(
        content,
        openai["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(last["eval_count"], openai["usage"]["completion_tokens"]);
    assert_eq!(last["prompt_eval_count"], openai["usage"]["prompt_tokens"]);
    assert_eq!(
        last["done_reason"], openai["choices"][0]["finish_reason"],
        "{last}"
    );

    // stream: false is one object with the whole text.
    let whole = post(
        server.addr,
        "/api/chat",
        &json!({"model": model.trim_end_matches(":latest"), "messages": messages,
                "stream": false, "options": {"temperature": 0, "num_predict": 10}}),
    );
    assert_eq!(whole.status, 200, "{}", whole.text());
    let whole = whole.json();
    check_final(&whole);
    assert_eq!(whole["message"]["content"], content.as_str());
    assert_eq!(whole["eval_count"], last["eval_count"]);
    server.stop().unwrap();
}

#[test]
fn generate_returns_context_and_honours_num_predict() {
    let server = start_server(1, 8);
    let model = model_name(server.addr);
    let r = post(
        server.addr,
        "/api/generate",
        &json!({"model": model, "prompt": "Count from one to twenty.", "stream": false,
                "options": {"temperature": 0, "num_predict": 3}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let g = r.json();
    check_final(&g);
    assert_eq!(g["done_reason"], "length");
    assert_eq!(g["eval_count"], 3);
    assert!(!g["response"].as_str().unwrap().is_empty());
    let context = g["context"].as_array().unwrap();
    let (prompt, eval) = (
        g["prompt_eval_count"].as_u64().unwrap(),
        g["eval_count"].as_u64().unwrap(),
    );
    assert_eq!(context.len() as u64, prompt + eval, "{g}");
    assert!(context.iter().all(|id| id.as_u64().is_some()));

    // Streamed: each line has a `response` piece, one final object with the context.
    let r = post(
        server.addr,
        "/api/generate",
        &json!({"model": model, "prompt": "Count from one to twenty.",
                "options": {"temperature": 0, "num_predict": 3}}),
    );
    let lines = ndjson_lines(&r);
    let text: String = lines
        .iter()
        .map(|l| l["response"].as_str().unwrap())
        .collect();
    assert_eq!(text, g["response"].as_str().unwrap());
    assert_eq!(lines.last().unwrap()["context"], g["context"]);
    assert_eq!(lines.iter().filter(|l| l["done"] == true).count(), 1);

    // The context continues the conversation.
    let next = post(
        server.addr,
        "/api/generate",
        &json!({"model": model, "prompt": "Go on.", "stream": false, "context": g["context"],
                "options": {"temperature": 0, "num_predict": 3}}),
    )
    .json();
    assert!(
        next["prompt_eval_count"].as_u64().unwrap() > context.len() as u64,
        "{next}"
    );

    // Raw: the prompt as it is, no template.
    let raw = post(
        server.addr,
        "/api/generate",
        &json!({"model": model, "prompt": "The capital of France is", "raw": true,
                "stream": false, "options": {"temperature": 0, "num_predict": 3}}),
    )
    .json();
    check_final(&raw);
    assert!(
        raw["prompt_eval_count"].as_u64().unwrap() < 10,
        "no template around a raw prompt: {raw}"
    );

    // An empty prompt only "loads" the model.
    let load = post(
        server.addr,
        "/api/generate",
        &json!({"model": model, "stream": false}),
    )
    .json();
    assert_eq!(load["done_reason"], "load");
    server.stop().unwrap();
}

#[test]
fn root_version_show_and_ps() {
    let server = start_server(1, 8);
    let head = request(server.addr, "HEAD", "/", None);
    assert_eq!(head.status, 200);
    let root = request(server.addr, "GET", "/", None);
    assert_eq!(
        (root.status, root.text().as_str()),
        (200, "Ollama is running")
    );
    let version = request(server.addr, "GET", "/api/version", None).json();
    assert!(version["version"].as_str().is_some_and(|v| v.contains('.')));
    let model = model_name(server.addr);
    let show = post(server.addr, "/api/show", &json!({"model": model})).json();
    assert_eq!(show["model_info"]["general.architecture"], "gemma3");
    assert_eq!(show["details"]["family"], "gemma3");
    assert_eq!(show["details"]["quantization_level"], "Q4_K_M");
    let capabilities = show["capabilities"].as_array().unwrap();
    assert!(capabilities.contains(&json!("completion")) && capabilities.contains(&json!("tools")));
    assert!(
        !capabilities.contains(&json!("vision")),
        "a text-only model"
    );
    assert!(
        show["model_info"]["general.parameter_count"]
            .as_u64()
            .unwrap()
            > 200_000_000
    );
    let ps = request(server.addr, "GET", "/api/ps", None).json();
    assert_eq!(ps["models"][0]["name"], model.as_str());
    assert_eq!(ps["models"][0]["context_length"], 512);
    server.stop().unwrap();
}

#[test]
fn bad_requests_are_ollama_errors() {
    let server = start_server(1, 8);
    let model = model_name(server.addr);
    let error = |r: &HttpResponse, status: u16| {
        assert_eq!(r.status, status, "{}", r.text());
        let body = r.json();
        let message = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("not an Ollama error: {body}"));
        assert!(!message.is_empty());
        message.to_owned()
    };
    let r = request_raw(server.addr, "POST", "/api/chat", Some(b"{not json"));
    error(&r, 400);
    let chat = |body: Value| post(server.addr, "/api/chat", &body);
    let message = error(
        &chat(json!({"model": "nope:7b", "messages": [{"role": "user", "content": "hi"}]})),
        404,
    );
    assert!(
        message.contains("nope:7b") && message.contains("not found"),
        "{message}"
    );
    let user = json!([{"role": "user", "content": "hi"}]);
    error(&chat(json!({"messages": user})), 400);
    error(
        &chat(json!({"model": model, "messages": user, "format": 7})),
        400,
    );
    error(
        &chat(json!({"model": model, "messages": user, "format": "yaml"})),
        400,
    );
    error(
        &chat(json!({"model": model, "messages": user, "options": {"temperature": "hot"}})),
        400,
    );
    error(
        &chat(json!({"model": model, "messages": user, "think": true})),
        400,
    );
    error(&chat(json!({"model": model, "messages": "hi"})), 400);
    error(
        &chat(json!({"model": model, "messages": [{"role": "wizard", "content": "hi"}]})),
        400,
    );
    // A schema the engine cannot enforce is refused before generation.
    let message = error(
        &chat(json!({"model": model, "messages": user,
                     "format": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}})),
        400,
    );
    assert!(message.contains("schema"), "{message}");
    // An image that is not one, for a model without a vision tower: a 400 either way.
    error(
        &chat(
            json!({"model": model, "messages": [{"role": "user", "content": "hi",
                                                   "images": ["bm90IGFuIGltYWdl"]}]}),
        ),
        400,
    );
    let generate = |body: Value| post(server.addr, "/api/generate", &body);
    error(
        &generate(json!({"model": model, "prompt": "x", "template": "{{ .Prompt }}"})),
        400,
    );
    error(
        &generate(json!({"model": model, "prompt": "x", "suffix": "y"})),
        400,
    );
    error(
        &generate(json!({"model": model, "prompt": "x", "context": [-1]})),
        400,
    );
    error(
        &generate(json!({"model": model, "prompt": "x", "context": [999_999_999]})),
        400,
    );
    error(
        &post(server.addr, "/api/show", &json!({"model": "other"})),
        404,
    );
    error(&request(server.addr, "GET", "/api/nothing-here", None), 404);
    let big = vec![b' '; 100 * 1024];
    error(
        &request_raw(server.addr, "POST", "/api/generate", Some(&big)),
        413,
    );
    server.stop().unwrap();
}
