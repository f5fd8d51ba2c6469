//! OpenAI's Responses API (`POST /v1/responses`) with the real default model: the official
//! `openai` Python client (`scripts/responses_client_check.py`: create, stream, a JSON schema
//! format, `responses.parse`, a function call round trip) and raw HTTP checks of the event
//! stream, `max_output_tokens` and the error shapes.

mod common;

use common::*;
use serde_json::json;

#[test]
fn official_openai_client_drives_responses() {
    let server = start_server_with_context(2, 16, 2048);
    run_client_script(
        "responses_client_check.py",
        &[format!("http://{}/v1", server.addr)],
    );
    server.stop().expect("the server stops");
}

#[test]
fn max_output_tokens_makes_an_incomplete_response() {
    let server = start_server(1, 8);
    let r = post(
        server.addr,
        "/v1/responses",
        &json!({"input": "Count from one to twenty.", "max_output_tokens": 2, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = r.json();
    assert_eq!(r["object"], "response");
    assert_eq!(r["status"], "incomplete", "{r}");
    assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(r["usage"]["output_tokens"], 2);
    assert_eq!(r["output"][0]["type"], "message");
    assert_eq!(r["output"][0]["content"][0]["type"], "output_text");
    assert!(!r["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap()
        .is_empty());

    let done = post(
        server.addr,
        "/v1/responses",
        &json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi!"}]}],
                "instructions": "Answer with a color.", "max_output_tokens": 100,
                "temperature": 0,
                "text": {"format": {"type": "json_schema", "name": "c", "schema": {
                    "type": "object", "required": ["color"],
                    "properties": {"color": {"type": "string", "maxLength": 10}}}}}}),
    )
    .json();
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["incomplete_details"], serde_json::Value::Null);
    assert_eq!(done["instructions"], "Answer with a color.");
    let text = done["output"][0]["content"][0]["text"].as_str().unwrap();
    let value: serde_json::Value = serde_json::from_str(text).unwrap();
    assert!(value["color"].is_string(), "{text}");
    assert_eq!(done["text"]["format"]["type"], "json_schema");
    server.stop().unwrap();
}

#[test]
fn streamed_events_are_typed_numbered_and_complete() {
    let server = start_server(1, 8);
    let r = post(
        server.addr,
        "/v1/responses",
        &json!({"input": "Name a color.", "max_output_tokens": 8, "temperature": 0,
                "stream": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let events = sse_events(&r);
    for (i, (kind, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], kind.as_str(), "the event line names the type");
        assert_eq!(data["sequence_number"], i, "{data}");
    }
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds[..2], ["response.created", "response.in_progress"]);
    let (last_kind, last) = events.last().unwrap();
    assert!(
        last_kind == "response.completed" || last_kind == "response.incomplete",
        "{kinds:?}"
    );
    let deltas: String = events
        .iter()
        .filter(|(k, _)| k == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    let text = last["response"]["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap();
    assert_eq!(deltas, text);
    let whole = post(
        server.addr,
        "/v1/responses",
        &json!({"input": "Name a color.", "max_output_tokens": 8, "temperature": 0}),
    )
    .json();
    assert_eq!(whole["output"][0]["content"][0]["text"], text);
    let (streamed, again) = (&last["response"]["usage"], &whole["usage"]);
    assert_eq!(streamed["input_tokens"], again["input_tokens"]);
    assert_eq!(streamed["output_tokens"], again["output_tokens"]);
    // The same prompt again: all of it but the last token comes from the prefix cache.
    assert_eq!(streamed["input_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        again["input_tokens_details"]["cached_tokens"],
        again["input_tokens"].as_u64().unwrap() - 1
    );
    server.stop().unwrap();
}

#[test]
fn bad_requests_are_openai_errors() {
    let server = start_server(1, 8);
    let error = |body: serde_json::Value, param: &str| {
        let r = post(server.addr, "/v1/responses", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = r.json();
        assert!(e["error"]["message"].as_str().is_some(), "{e}");
        assert_eq!(e["error"]["param"], param, "{e}");
    };
    error(json!({"input": 3}), "input");
    error(json!({"model": "x"}), "input");
    error(json!({"input": []}), "input");
    error(json!({"input": [{"type": "telepathy"}]}), "input");
    error(json!({"input": [{"role": "user", "content": 5}]}), "input");
    error(
        json!({"input": [{"role": "wizard", "content": "hi"}]}),
        "input",
    );
    error(
        json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}),
        "text.format",
    );
    error(
        json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "a",
               "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}}),
        "text.format",
    );
    error(
        json!({"input": "x", "tools": [{"type": "web_search"}]}),
        "tools",
    );
    error(
        json!({"input": "x", "max_output_tokens": 0}),
        "max_output_tokens",
    );
    error(json!({"input": "x", "temperature": 9}), "temperature");
    error(
        json!({"input": "x", "previous_response_id": "resp_1"}),
        "previous_response_id",
    );
    let r = request_raw(server.addr, "POST", "/v1/responses", Some(b"[1, 2"));
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].is_string());
    server.stop().unwrap();
}
