//! Structured output and function calling against the real model: `response_format`
//! schemas always validate, unsupported schemas are 400s, and a tool call round trip works
//! (plain and streamed).

mod common;

use std::net::SocketAddr;
use std::sync::OnceLock;

use common::*;
use gemma_engine::sampling::SplitMix64;
use gemma_server::RunningServer;
use serde_json::{json, Map, Value};

fn server() -> SocketAddr {
    static SERVER: OnceLock<RunningServer> = OnceLock::new();
    SERVER.get_or_init(|| start_server(2, 16)).addr
}

/// A random object schema over the subset the test's validator understands.
fn random_schema(rng: &mut SplitMix64) -> Value {
    let names = [
        "name", "age", "city", "active", "score", "color", "count", "tag",
    ];
    let n_props = 1 + (rng.next_u64() % 3) as usize;
    let mut props = Map::new();
    for k in 0..n_props {
        let name = names[(rng.next_u64() as usize + k) % names.len()];
        let schema = match rng.next_u64() % 5 {
            0 => json!({"type": "integer", "minimum": 0, "maximum": 1000}),
            1 => json!({"type": "boolean"}),
            2 => json!({"type": "string", "enum": ["red", "green", "blue"]}),
            3 => json!({"type": "string", "maxLength": 8}),
            _ => {
                json!({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3})
            }
        };
        props.insert(name.to_owned(), schema);
    }
    let required: Vec<&String> = props.keys().collect();
    json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
}

/// Checks `value` against a schema built by `random_schema`.
fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    match schema["type"].as_str() {
        Some("object") => {
            let obj = value.as_object().ok_or("not an object")?;
            let props = schema["properties"].as_object().unwrap();
            for key in obj.keys() {
                if !props.contains_key(key) {
                    return Err(format!("extra key {key}"));
                }
            }
            for (key, sub) in props {
                validate(sub, obj.get(key).ok_or(format!("missing {key}"))?)?;
            }
            Ok(())
        }
        Some("integer") => {
            let n = value.as_i64().ok_or("not an integer")?;
            let (lo, hi) = (
                schema["minimum"].as_i64().unwrap(),
                schema["maximum"].as_i64().unwrap(),
            );
            (lo..=hi)
                .contains(&n)
                .then_some(())
                .ok_or(format!("{n} out of range"))
        }
        Some("boolean") => value.as_bool().map(|_| ()).ok_or("not a boolean".into()),
        Some("string") => {
            let s = value.as_str().ok_or("not a string")?;
            if let Some(options) = schema["enum"].as_array() {
                return options
                    .contains(value)
                    .then_some(())
                    .ok_or(format!("{s} not in enum"));
            }
            let max = schema["maxLength"].as_u64().unwrap() as usize;
            (s.chars().count() <= max)
                .then_some(())
                .ok_or(format!("{s:?} too long"))
        }
        Some("array") => {
            let items = value.as_array().ok_or("not an array")?;
            if items.len() > schema["maxItems"].as_u64().unwrap() as usize {
                return Err("too many items".into());
            }
            items
                .iter()
                .try_for_each(|item| validate(&schema["items"], item))
        }
        other => Err(format!("unexpected schema type {other:?}")),
    }
}

#[test]
fn json_schema_output_always_validates() {
    let addr = server();
    let mut rng = SplitMix64::new(2026);
    for i in 0..20 {
        let schema = random_schema(&mut rng);
        let body = json!({
            "messages": [{"role": "user", "content": "Fill in a record with plausible values."}],
            "max_tokens": 80, "temperature": 0.7, "seed": i,
            "response_format": {"type": "json_schema", "json_schema": {"name": "record", "schema": schema}},
        });
        let r = post(addr, "/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "schema {schema}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        let value: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("schema {schema}: output {text:?} is not JSON: {e}"));
        if let Err(e) = validate(&schema, &value) {
            panic!("schema {schema}: output {text} does not validate: {e}");
        }
    }
}

#[test]
fn json_object_mode_gives_an_object() {
    let addr = server();
    let body = json!({
        "messages": [{"role": "user", "content": "Describe a cat as JSON."}],
        "max_tokens": 60, "temperature": 0,
        "response_format": {"type": "json_object"},
    });
    let v = post(addr, "/v1/chat/completions", &body).json();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    if v["choices"][0]["finish_reason"] == "stop" {
        let value: Value = serde_json::from_str(text).expect("a complete JSON document");
        assert!(value.is_object(), "{text}");
    } else {
        assert!(text.starts_with('{'), "{text}");
    }
}

#[test]
fn unsupported_schemas_are_400s_naming_the_problem() {
    let addr = server();
    let schema = json!({"type": "string", "pattern": "(?=a)b"});
    let body = json!({
        "messages": [{"role": "user", "content": "Hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    });
    let r = post(addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 400, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], "unsupported_schema");
    assert_eq!(v["error"]["param"], "response_format");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("unsupported JSON schema") && message.len() > 30,
        "{message}"
    );
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                           "required": ["city"], "additionalProperties": false}
        }},
        {"type": "function", "function": {
            "name": "get_time",
            "description": "Current local time in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                           "required": ["city"], "additionalProperties": false}
        }}
    ])
}

/// `tool_choice` naming one function.
fn named(function: &str) -> Value {
    json!({"type": "function", "function": {"name": function}})
}

/// A greedy request with the weather tools and `tool_choice`.
fn tools_request(question: &str, tool_choice: Value) -> Value {
    json!({
        "messages": [{"role": "user", "content": question}],
        "tools": weather_tools(), "tool_choice": tool_choice,
        "max_tokens": 40, "temperature": 0,
    })
}

#[test]
fn tool_call_round_trip() {
    let addr = server();
    let question = json!({"role": "user", "content": "What is the weather in Paris?"});
    let body = json!({
        "messages": [question], "tools": weather_tools(), "tool_choice": "required",
        "max_tokens": 40, "temperature": 0,
    });
    let v = post(addr, "/v1/chat/completions", &body).json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert!(choice["message"]["content"].is_null());
    let call = &choice["message"]["tool_calls"][0];
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["type"], "function");
    let name = call["function"]["name"].as_str().unwrap();
    assert!(name == "get_weather" || name == "get_time");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{args}");

    // The result goes back as a `tool` message; the model answers in text.
    let follow_up = json!({
        "messages": [
            question,
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature_c\": 21, \"sky\": \"sunny\"}"},
        ],
        "tools": weather_tools(), "tool_choice": "none", "max_tokens": 8, "temperature": 0,
    });
    let r = post(addr, "/v1/chat/completions", &follow_up);
    assert_eq!(r.status, 200, "{}", r.text());
    let v2 = r.json();
    assert!(v2["choices"][0]["message"]["content"].is_string());
    assert_ne!(v2["choices"][0]["finish_reason"], "tool_calls");
    // Question, rendered call and tool output: well over the ~15 tokens of the question.
    assert!(v2["usage"]["prompt_tokens"].as_u64().unwrap() > 40, "{v2}");
}

/// The same greedy request streamed and not: (stream chunks, plain reply).
fn streamed_and_plain(addr: SocketAddr, body: &Value) -> (Vec<Value>, Value) {
    let plain = post(addr, "/v1/chat/completions", body);
    assert_eq!(plain.status, 200, "{}", plain.text());
    (post_stream(addr, body), plain.json())
}

#[test]
fn a_forced_call_streams_its_arguments_as_they_are_generated() {
    let addr = server();
    let body = tools_request("What time is it in Tokyo?", named("get_time"));
    let (chunks, plain) = streamed_and_plain(addr, &body);
    let calls = streamed_tool_calls(&chunks);
    assert_eq!(calls.len(), 1, "{chunks:?}");
    let call = &calls[0];
    assert!(call.id.starts_with("call_"), "{}", call.id);
    assert_eq!(call.kind, "function");
    assert_eq!(call.name, "get_time");
    // The call opens with empty arguments; they follow piece by piece as generated.
    let opening = chunks
        .iter()
        .find_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .unwrap();
    assert_eq!(opening["function"]["arguments"], "");
    assert!(call.argument_chunks > 1, "{chunks:?}");
    let expected = &plain["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(call.arguments, expected["arguments"].as_str().unwrap());
    let args: Value = serde_json::from_str(&call.arguments).unwrap();
    assert!(args["city"].is_string(), "{args}");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "tool_calls"
    );
    assert_eq!(plain["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(streamed_content(&chunks), "");
}

/// Streams and asks `body` in `auto` tool mode; checks that both paths give the same text,
/// calls and finish reason, and returns the number of calls.
fn assert_auto_paths_agree(addr: SocketAddr, body: &Value) -> usize {
    let (chunks, plain) = streamed_and_plain(addr, body);
    let message = &plain["choices"][0]["message"];
    assert_eq!(
        streamed_content(&chunks),
        message["content"].as_str().unwrap_or(""),
        "{body}"
    );
    let expected = message["tool_calls"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let calls = streamed_tool_calls(&chunks);
    assert_eq!(calls.len(), expected.len(), "{body}: {plain}");
    for (call, want) in calls.iter().zip(&expected) {
        assert_eq!(call.name, want["function"]["name"].as_str().unwrap());
        assert_eq!(
            call.arguments,
            want["function"]["arguments"].as_str().unwrap()
        );
    }
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        plain["choices"][0]["finish_reason"],
    );
    calls.len()
}

#[test]
fn auto_tool_choice_streams_what_the_plain_reply_says() {
    let addr = server();
    // Whatever the model makes of these (this small base model answers in text).
    for question in ["What is the weather in Paris?", "Tell me a joke."] {
        let mut body = tools_request(question, json!("auto"));
        body["max_tokens"] = json!(20);
        assert_auto_paths_agree(addr, &body);
    }
    // A reply shaped as a call by `response_format`: in `auto` mode it is recognized as one
    // while it streams.
    let mut body = tools_request("What time is it in Lima?", json!("auto"));
    let call_shape = json!({
        "type": "object",
        "properties": {
            "name": {"const": "get_time"},
            "parameters": weather_tools()[1]["function"]["parameters"],
        },
        "required": ["name", "parameters"], "additionalProperties": false,
    });
    body["response_format"] =
        json!({"type": "json_schema", "json_schema": {"name": "call", "schema": call_shape}});
    assert_eq!(assert_auto_paths_agree(addr, &body), 1);
}

#[test]
fn bad_tool_choices_are_400s() {
    let addr = server();
    let body = tools_request("Hi", named("launch_rocket"));
    let r = post(addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("launch_rocket"));
}

#[test]
fn generate_json_without_the_server_validates() {
    // The library path behind `gemma run --json-schema FILE`.
    std::env::set_var("GEMMA_THREADS", "1");
    let path = gemma_engine::ensure_default_model().unwrap();
    let loaded = gemma_engine::load(Some(&path), &Default::default()).unwrap();
    let prompt = loaded
        .render_chat(
            None,
            &[gemma_engine::gemma_tokenizer::ChatMessage::new(
                "user",
                "Invent a city.",
            )],
        )
        .unwrap();
    let ids = loaded.encode_prompt(&prompt).unwrap();
    let mut rng = SplitMix64::new(7);
    let schema = random_schema(&mut rng);
    let params = gemma_engine::SamplingParams {
        max_tokens: 80,
        seed: Some(3),
        ..Default::default()
    };
    let mut streamed = String::new();
    let text = gemma_server::constrain::generate_json(
        std::sync::Arc::new(loaded),
        &ids,
        &params,
        512,
        &schema,
        &mut |piece| streamed.push_str(piece),
    )
    .unwrap();
    assert_eq!(streamed, text);
    let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
    validate(&schema, &value).unwrap_or_else(|e| panic!("{schema} {text}: {e}"));
}
