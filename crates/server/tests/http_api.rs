//! The OpenAI-compatible endpoints against the real default model on a loopback port:
//! shapes, exact usage, streaming, stop strings, seeds, logprobs, and error statuses.

mod common;

use std::net::SocketAddr;
use std::sync::OnceLock;

use common::*;
use gemma_engine::gemma_tokenizer::ChatMessage;
use gemma_engine::LoadedModel;
use gemma_server::RunningServer;
use serde_json::{json, Value};

fn server() -> SocketAddr {
    static SERVER: OnceLock<RunningServer> = OnceLock::new();
    SERVER.get_or_init(|| start_server(2, 16)).addr
}

/// An independent copy of the model for computing expected token counts.
fn reference() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = gemma_engine::ensure_default_model().unwrap();
        gemma_engine::load(Some(&path), &Default::default()).unwrap()
    })
}

fn prompt_tokens(prompt: &str) -> usize {
    let m = reference();
    let rendered = m
        .render_chat(None, &[ChatMessage::new("user", prompt)])
        .unwrap();
    m.encode_prompt(&rendered).unwrap().len()
}

#[test]
fn chat_completion_has_the_openai_shape_and_exact_usage() {
    let addr = server();
    let r = post(addr, "/v1/chat/completions", &chat_body("Name a color.", 6));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty());
    let finish = choice["finish_reason"].as_str().unwrap();
    assert!(finish == "length" || finish == "stop", "{finish}");
    let usage = &v["usage"];
    assert_eq!(usage["prompt_tokens"], prompt_tokens("Name a color."));
    let completion = usage["completion_tokens"].as_u64().unwrap();
    if finish == "length" {
        assert_eq!(completion, 6);
    } else {
        assert!(completion <= 6);
    }
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion
    );
}

#[test]
fn streaming_matches_the_non_streaming_answer() {
    let addr = server();
    let body = chat_body("Write one short sentence about the sea.", 8);
    let full = post(addr, "/v1/chat/completions", &body).json();
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let r = post(addr, "/v1/chat/completions", &streamed);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let chunks = sse_chunks(&r);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(
        streamed_content(&chunks),
        full["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let finish_chunk = &chunks[chunks.len() - 2];
    assert_eq!(
        finish_chunk["choices"][0]["finish_reason"],
        full["choices"][0]["finish_reason"]
    );
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], full["usage"]);
}

#[test]
fn stop_strings_cut_the_output() {
    let addr = server();
    let body = chat_body("Write two sentences about cats.", 24);
    let free = post(addr, "/v1/chat/completions", &body).json();
    let text = free["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    // Stop at a word of the free answer: the output must be exactly what preceded it.
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() >= 3, "answer too short: {text:?}");
    let stop = words[words.len() / 2];
    let cut = text.find(stop).unwrap();
    let mut stopped = body.clone();
    stopped["stop"] = json!(["never appears", stop]);
    let v = post(addr, "/v1/chat/completions", &stopped).json();
    assert_eq!(v["choices"][0]["message"]["content"], text[..cut]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[test]
fn the_same_seed_gives_the_same_sample() {
    let addr = server();
    let body = json!({
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": 8, "temperature": 1.0, "seed": 1234,
    });
    let a = post(addr, "/v1/chat/completions", &body).json();
    let b = post(addr, "/v1/chat/completions", &body).json();
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
    assert_eq!(a["usage"], b["usage"]);
}

#[test]
fn completions_endpoint_and_logprobs() {
    let addr = server();
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "logprobs": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    let choice = &v["choices"][0];
    let expected_prompt = reference()
        .encode_prompt("The capital of France is")
        .unwrap()
        .len();
    assert_eq!(v["usage"]["prompt_tokens"], expected_prompt);
    let lp = &choice["logprobs"];
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
    let tokens: String = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens, choice["text"].as_str().unwrap());
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert_eq!(top.len(), 2);
        // Greedy: the chosen token is the most likely one.
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        assert!((best - chosen).abs() < 1e-4 && chosen <= 0.0);
    }
}

#[test]
fn chat_logprobs_cover_every_token() {
    let addr = server();
    let mut body = chat_body("Say hi.", 4);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let v = post(addr, "/v1/chat/completions", &body).json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert!(content
        .iter()
        .all(|t| t["top_logprobs"].as_array().unwrap().len() == 3));
}

#[test]
fn models_health_and_metrics() {
    let addr = server();
    let models = request(addr, "GET", "/v1/models", None);
    assert_eq!(models.status, 200);
    let v = models.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["object"], "model");
    assert!(v["data"][0]["id"].as_str().unwrap().contains("gemma"));
    assert_eq!(request(addr, "GET", "/health", None).json()["status"], "ok");
    post(addr, "/v1/chat/completions", &chat_body("Hi", 2));
    let metrics = request(addr, "GET", "/metrics", None).text();
    for name in [
        "gemma_requests_total",
        "gemma_prompt_tokens_total",
        "gemma_completion_tokens_total",
        "gemma_queue_depth",
        "gemma_tokens_per_second",
        "gemma_time_to_first_token_seconds_count",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    assert!(metric(addr, "gemma_requests_total") >= 1.0);
    assert!(metric(addr, "gemma_completion_tokens_total") >= 1.0);
}

fn assert_error(r: &HttpResponse, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    let message = v["error"]["message"]
        .as_str()
        .expect("an OpenAI-style error");
    assert!(v["error"]["type"].is_string());
    assert!(
        message.contains(needle),
        "error should mention {needle:?}: {message}"
    );
}

#[test]
fn bad_requests_get_clear_errors() {
    let addr = server();
    let path = "/v1/chat/completions";
    assert_error(
        &request_raw(addr, "POST", path, Some(b"{not json")),
        400,
        "invalid request body",
    );
    assert_error(
        &post(addr, path, &json!({"messages": "hi"})),
        400,
        "invalid",
    );
    assert_error(
        &post(addr, path, &json!({"max_tokens": 3})),
        400,
        "messages",
    );
    let mut wrong_type = chat_body("hi", 2);
    wrong_type["temperature"] = json!("hot");
    assert_error(&post(addr, path, &wrong_type), 400, "invalid");
    let mut bad_range = chat_body("hi", 2);
    bad_range["top_p"] = json!(1.5);
    assert_error(&post(addr, path, &bad_range), 400, "top_p");
    let mut two = chat_body("hi", 2);
    two["n"] = json!(2);
    assert_error(&post(addr, path, &two), 400, "n = 1");
    let image = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    ]}]});
    assert_error(&post(addr, path, &image), 400, "image");
    assert_error(
        &post(
            addr,
            path,
            &json!({"messages": [{"role": "wizard", "content": "x"}]}),
        ),
        400,
        "role",
    );
    let long = "hello ".repeat(600);
    let r = post(addr, path, &chat_body(&long, 2));
    assert_error(&r, 400, "context size");
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    let huge = vec![b' '; 100 * 1024];
    assert_error(&request_raw(addr, "POST", path, Some(&huge)), 413, "larger");
    assert_error(
        &request(addr, "GET", "/v1/nothing", None),
        404,
        "no such endpoint",
    );
    // The server is still fine afterwards.
    assert_eq!(post(addr, path, &chat_body("Hi", 1)).status, 200);
}

/// `logit_bias` is applied (a +100 token is what greedy decoding picks, a -100 token is never
/// picked) and every key and value is checked against the model.
#[test]
fn logit_bias_steers_the_answer_and_bad_keys_are_refused() {
    let addr = server();
    let path = "/v1/chat/completions";
    let plain = post(addr, path, &chat_body("Name a color.", 1)).json();
    let first = plain["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let tokenizer = reference().tokenizer.as_ref().unwrap();
    let first_id = tokenizer.encode(&first, false, false).unwrap()[0];
    // Banning the greedy answer's token changes the answer.
    let mut banned = chat_body("Name a color.", 1);
    banned["logit_bias"] = json!({ first_id.to_string(): -100 });
    let v = post(addr, path, &banned).json();
    assert_ne!(v["choices"][0]["message"]["content"], first.as_str(), "{v}");
    // Forcing a token makes it the answer.
    let forced_id = tokenizer.encode(" zebra", false, false).unwrap()[0];
    let forced_text = tokenizer.decode(&[forced_id], true).unwrap();
    let mut forced = chat_body("Name a color.", 1);
    forced["logit_bias"] = json!({ forced_id.to_string(): 100 });
    let v = post(addr, path, &forced).json();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content.trim(), forced_text.trim(), "{v}");

    for (bias, needle) in [
        (json!({"abc": 1}), "\"abc\" is not a token id"),
        (json!({"-3": 1}), "is not a token id"),
        (json!({"99999999": 1}), "is not a token id"),
        (json!({"5": 101}), "between -100 and 100"),
        (json!({"5": "high"}), "between -100 and 100"),
    ] {
        let mut body = chat_body("hi", 1);
        body["logit_bias"] = bias;
        let r = post(addr, path, &body);
        assert_error(&r, 400, needle);
        assert_eq!(r.json()["error"]["param"], "logit_bias");
    }
}

/// Tool results must answer a call the conversation made; replayed calls must be well formed.
#[test]
fn tool_messages_must_answer_an_earlier_call() {
    let addr = server();
    let path = "/v1/chat/completions";
    let call = json!({"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}});
    let conversation = |assistant_call: Value, tool: Value| {
        json!({"messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [assistant_call]},
            tool,
        ], "max_tokens": 2, "temperature": 0})
    };
    let ok = post(
        addr,
        path,
        &conversation(
            call.clone(),
            json!({"role": "tool", "tool_call_id": "call_1", "content": "sunny"}),
        ),
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    let missing = post(
        addr,
        path,
        &conversation(call.clone(), json!({"role": "tool", "content": "sunny"})),
    );
    assert_error(&missing, 400, "no tool_call_id");
    assert_eq!(missing.json()["error"]["param"], "messages[2].tool_call_id");
    let unknown = post(
        addr,
        path,
        &conversation(
            call.clone(),
            json!({"role": "tool", "tool_call_id": "call_9", "content": "sunny"}),
        ),
    );
    assert_error(&unknown, 400, "\"call_9\" does not match any tool call");
    // A tool message before any call.
    let early = json!({"messages": [
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "hi"},
    ], "max_tokens": 2});
    assert_error(
        &post(addr, path, &early),
        400,
        "does not match any tool call",
    );
    let mut bad_args = call.clone();
    bad_args["function"]["arguments"] = json!("{city: Paris");
    assert_error(
        &post(
            addr,
            path,
            &conversation(
                bad_args,
                json!({"role": "tool", "tool_call_id": "call_1", "content": "x"}),
            ),
        ),
        400,
        "messages[1].tool_calls[0] has function.arguments that are not a JSON object",
    );
    let mut bad_kind = call.clone();
    bad_kind["type"] = json!("retrieval");
    assert_error(
        &post(
            addr,
            path,
            &conversation(
                bad_kind,
                json!({"role": "tool", "tool_call_id": "call_1", "content": "x"}),
            ),
        ),
        400,
        "only \"function\" is supported",
    );
    let legacy = json!({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "function", "content": "42"},
    ], "max_tokens": 2});
    assert_error(
        &post(addr, path, &legacy),
        400,
        "role \"function\" but no name",
    );
}

#[test]
fn content_part_arrays_are_text() {
    let addr = server();
    let parts = json!({
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Name a color."}]}],
        "max_tokens": 4, "temperature": 0,
    });
    let a = post(addr, "/v1/chat/completions", &parts).json();
    let b = post(addr, "/v1/chat/completions", &chat_body("Name a color.", 4)).json();
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
    assert_eq!(a["usage"], b["usage"]);
}

/// A body announced far over the limit is refused from its headers alone: the 413 arrives
/// while the client has sent almost nothing (before, the server waited for the body).
#[test]
fn an_announced_body_over_the_limit_is_refused_at_once() {
    use std::io::{BufReader, Write};
    let addr = server();
    let mut stream = connect(addr);
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n\
                Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{\"mess";
    stream.write_all(head.as_bytes()).unwrap();
    let started = std::time::Instant::now();
    let (status, _) = read_head(&mut BufReader::new(&stream));
    assert_eq!(status, 413);
    assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
}
