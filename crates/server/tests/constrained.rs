//! Structured output and function calling against the real model: `response_format`
//! schemas always validate (random bounded ones, and 24 unbounded ones as users write them,
//! greedy and sampled), unsupported, recursive, cyclic and dangling schemas are 400s (in
//! `response_format` and in tool parameters), a cut-off answer says `length`, and a tool call
//! round trip works (plain and streamed).

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

/// Checks `value` against `schema` (resolving `$ref`s in `root`) for the keywords these
/// tests use, with this server's rule that an object schema listing `properties` without
/// `additionalProperties` allows no other keys.
fn validate(root: &Value, schema: &Value, value: &Value) -> Result<(), String> {
    if let Some(reference) = schema["$ref"].as_str() {
        let target = root
            .pointer(reference.trim_start_matches('#'))
            .ok_or(format!("no {reference}"))?;
        return validate(root, target, value);
    }
    if let Some(options) = schema["anyOf"].as_array() {
        return options
            .iter()
            .any(|s| validate(root, s, value).is_ok())
            .then_some(())
            .ok_or(format!("{value} matches no anyOf option"));
    }
    if let Some(options) = schema["enum"].as_array() {
        if !options.contains(value) {
            return Err(format!("{value} not in the enum"));
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let type_ok = |t: &str| match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => false,
    };
    if !types.is_empty() && !types.iter().any(|t| type_ok(t)) {
        return Err(format!("{value} is not of type {types:?}"));
    }
    if let Some(n) = value.as_f64() {
        if schema["minimum"].as_f64().is_some_and(|m| n < m)
            || schema["maximum"].as_f64().is_some_and(|m| n > m)
        {
            return Err(format!("{n} out of range"));
        }
    }
    if let Some(s) = value.as_str() {
        if schema["maxLength"]
            .as_u64()
            .is_some_and(|m| s.chars().count() as u64 > m)
        {
            return Err(format!("{s:?} too long"));
        }
    }
    if let Some(items) = value.as_array() {
        if schema["maxItems"]
            .as_u64()
            .is_some_and(|m| items.len() as u64 > m)
        {
            return Err("too many items".into());
        }
        if schema["items"].is_object() {
            for item in items {
                validate(root, &schema["items"], item)?;
            }
        }
    }
    if let (Some(object), Some(props)) = (value.as_object(), schema["properties"].as_object()) {
        for (key, item) in object {
            match props.get(key) {
                Some(sub) => validate(root, sub, item)?,
                None if schema["additionalProperties"] == json!(true) => {}
                None => return Err(format!("invented key {key:?}")),
            }
        }
        for key in schema["required"].as_array().into_iter().flatten() {
            if !object.contains_key(key.as_str().unwrap()) {
                return Err(format!("missing {key}"));
            }
        }
    }
    Ok(())
}

/// The documented defaults hold for every value of an answer: integers and numbers within
/// ±(10^15 - 1) with at most 6 decimals, strings of at most 256 characters, arrays of at most
/// 32 items.
fn within_default_limits(text: &str, value: &Value) -> Result<(), String> {
    match value {
        Value::Number(n) => {
            let n = n.as_f64().unwrap();
            if n.abs() > 999_999_999_999_999.0 {
                return Err(format!("{n} has more than 15 integer digits"));
            }
        }
        Value::String(s) if s.chars().count() > 256 => return Err(format!("{s:?} is too long")),
        Value::Array(items) if items.len() > 32 => return Err("more than 32 items".into()),
        _ => {}
    }
    let children: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        Value::Object(map) => map.values().collect(),
        _ => vec![],
    };
    children
        .into_iter()
        .try_for_each(|v| within_default_limits(text, v))?;
    // Decimals, from the text (f64 would round them).
    let mut digits_after_point = 0;
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
            continue;
        }
        match c {
            '"' => in_string = true,
            '.' => digits_after_point = 0,
            '0'..='9' if digits_after_point >= 0 => {
                digits_after_point += 1;
                if digits_after_point > 6 {
                    return Err(format!("a number in {text} has more than 6 decimals"));
                }
            }
            _ => digits_after_point = i32::MIN,
        }
    }
    Ok(())
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
        if let Err(e) = validate(&schema, &schema, &value) {
            panic!("schema {schema}: output {text} does not validate: {e}");
        }
    }
}

/// Schemas as users write them (no `additionalProperties`, no bounds), each with the prompt
/// it comes with: objects of strings, integers, numbers, booleans and enums, nested objects,
/// arrays of integers, numbers, strings, enums and objects, optional fields, a pydantic-style
/// `$defs` model, an `anyOf` with null, a top-level array.
fn user_schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "Invent a person.",
            json!({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"]}),
        ),
        (
            "Describe a city.",
            json!({"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}, "area_km2": {"type": "number"}}, "required": ["city", "population", "area_km2"]}),
        ),
        (
            "Describe a product for an online shop.",
            json!({"type": "object", "properties": {"title": {"type": "string"}, "price": {"type": "number"}, "in_stock": {"type": "boolean"}}, "required": ["title", "price", "in_stock"]}),
        ),
        (
            "Pick a color.",
            json!({"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}, "shade": {"type": "string"}}, "required": ["color", "shade"]}),
        ),
        (
            "Create a user account.",
            json!({"type": "object", "properties": {"user": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}}, "required": ["name", "email"]}, "active": {"type": "boolean"}}, "required": ["user", "active"]}),
        ),
        (
            "Give me five random numbers between 1 and 100.",
            json!({"type": "object", "properties": {"values": {"type": "array", "items": {"type": "integer"}}}, "required": ["values"]}),
        ),
        (
            "Write a shopping list with three items.",
            json!({"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}, "quantity": {"type": "integer"}}, "required": ["name", "quantity"]}}}, "required": ["items"]}),
        ),
        (
            "Make a profile.",
            json!({"type": "object", "properties": {"name": {"type": "string"}, "nickname": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name"]}),
        ),
        (
            "Recommend a book.",
            json!({"type": "object", "properties": {"title": {"type": "string"}, "author": {"type": "string"}, "year": {"type": "integer"}, "pages": {"type": "integer"}}, "required": ["title", "author", "year", "pages"]}),
        ),
        (
            "What is the weather like?",
            json!({"type": "object", "properties": {"city": {"type": "string"}, "temperature": {"type": "number"}, "conditions": {"type": "string", "enum": ["sunny", "cloudy", "rain", "snow"]}, "humidity": {"type": "integer"}}, "required": ["city", "temperature", "conditions", "humidity"]}),
        ),
        (
            "Give a point on a map.",
            json!({"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}),
        ),
        (
            "Give a title and three tags for an article about cooking pasta.",
            json!({"type": "object", "properties": {"title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["title", "tags"]}),
        ),
        (
            "Plan an event.",
            json!({"type": "object", "properties": {"name": {"type": "string"}, "date": {"type": "string"}, "attendees": {"type": "integer"}, "virtual": {"type": "boolean"}}, "required": ["name", "date", "attendees", "virtual"]}),
        ),
        (
            "Where does Alice live? Give her address.",
            json!({"type": "object", "properties": {"name": {"type": "string"}, "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}}, "required": ["street", "city", "zip"]}}, "required": ["name", "address"]}),
        ),
        (
            "Record a player's last three scores.",
            json!({"type": "object", "properties": {"player": {"type": "string"}, "scores": {"type": "array", "items": {"type": "number"}}}, "required": ["player", "scores"]}),
        ),
        (
            "Write an order with two lines.",
            json!({"type": "object", "properties": {"order_id": {"type": "integer"}, "lines": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer"}, "price": {"type": "number"}}, "required": ["sku", "quantity", "price"]}}}, "required": ["order_id", "lines"]}),
        ),
        (
            "Configure the app.",
            json!({"type": "object", "properties": {"debug": {"type": "boolean"}, "level": {"type": "string", "enum": ["low", "medium", "high"]}, "retries": {"type": "integer"}}, "required": ["debug", "level", "retries"]}),
        ),
        (
            "Describe a movie and give its two main genres.",
            json!({"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}, "rating": {"type": "number"}, "genres": {"type": "array", "items": {"type": "string", "enum": ["drama", "comedy", "action", "horror"]}}}, "required": ["title", "year", "rating", "genres"]}),
        ),
        (
            "Describe a company.",
            json!({"$defs": {"Address": {"properties": {"city": {"title": "City", "type": "string"}, "country": {"title": "Country", "type": "string"}}, "required": ["city", "country"], "title": "Address", "type": "object"}}, "properties": {"name": {"title": "Name", "type": "string"}, "employees": {"title": "Employees", "type": "integer"}, "hq": {"$ref": "#/$defs/Address"}}, "required": ["name", "employees", "hq"], "title": "Company", "type": "object"}),
        ),
        (
            "Sign up Bob for the newsletter with his email address.",
            json!({"type": "object", "properties": {"name": {"type": "string"}, "email": {"anyOf": [{"type": "string"}, {"type": "null"}]}}, "required": ["name", "email"]}),
        ),
        (
            "List the first four prime numbers.",
            json!({"type": "array", "items": {"type": "integer"}}),
        ),
        (
            "Count the apples.",
            json!({"type": "object", "properties": {"count": {"type": "integer", "minimum": 0}}, "required": ["count"]}),
        ),
        (
            "Describe a planet.",
            json!({"type": "object", "properties": {"name": {"type": "string"}, "mass_kg": {"type": "number"}, "moons": {"type": "integer"}, "has_rings": {"type": "boolean"}}, "required": ["name", "mass_kg", "moons", "has_rings"]}),
        ),
        (
            "Rate the restaurant.",
            json!({"type": "object", "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "comment": {"type": "string"}, "would_return": {"type": "boolean"}}}),
        ),
    ]
}

/// Each user schema with temperature 0 and with the default sampling, 400 tokens at most:
/// every answer ends by itself (`stop`), parses, invents no key and validates.
#[test]
fn user_schemas_without_bounds_always_end_and_validate() {
    let addr = server();
    let schemas = user_schemas();
    assert!(schemas.len() >= 20);
    // One thread per sampling setting keeps both server slots busy.
    let failures: Vec<String> = std::thread::scope(|scope| {
        let runs: Vec<_> = [Some(0.0), None]
            .into_iter()
            .map(|temperature| {
                let schemas = &schemas;
                scope.spawn(move || {
                    let answers = schemas.iter().enumerate().map(|(i, (prompt, schema))| {
                        answer_validates(addr, i, prompt, schema, temperature).map_err(|e| {
                            format!("schema {i} ({prompt}), temperature {temperature:?}: {e}")
                        })
                    });
                    answers.filter_map(Result::err).collect::<Vec<_>>()
                })
            })
            .collect();
        runs.into_iter()
            .flat_map(|run| run.join().unwrap())
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {} answers failed:\n{}",
        failures.len(),
        2 * schemas.len(),
        failures.join("\n")
    );
}

/// Asks `prompt` under `schema` (seed `seed`; the default temperature when `None`) and checks
/// the answer.
fn answer_validates(
    addr: SocketAddr,
    seed: usize,
    prompt: &str,
    schema: &Value,
    temperature: Option<f64>,
) -> Result<(), String> {
    let mut body = json!({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 400, "seed": seed,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    });
    if let Some(t) = temperature {
        body["temperature"] = json!(t);
    }
    let r = post(addr, "/v1/chat/completions", &body);
    if r.status != 200 {
        return Err(r.text());
    }
    let v = r.json();
    let text = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
    let finish = &v["choices"][0]["finish_reason"];
    if finish != "stop" {
        return Err(format!("finish_reason {finish}: {text}"));
    }
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("{text:?} is not JSON: {e}"))?;
    validate(schema, schema, &value).map_err(|e| format!("{text}: {e}"))?;
    within_default_limits(text, &value).map_err(|e| format!("{text}: {e}"))
}

/// Schemas no document satisfies, or that the engine cannot read, in `response_format` and in
/// a tool's `parameters` (whatever `tool_choice` says): 400s naming the problem, before any
/// token.
#[test]
fn recursive_cyclic_and_dangling_schemas_are_400s() {
    let addr = server();
    let refused = [
        (json!({"$ref": "#"}), "recursive"),
        (
            json!({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
            "recursive",
        ),
        (
            json!({"type": "object", "properties": {"name": {"type": "string"}, "child": {"$ref": "#"}},
                   "required": ["name", "child"]}),
            "recursive",
        ),
        (
            json!({"$defs": {"node": {"type": "object",
                   "properties": {"next": {"$ref": "#/$defs/node"}}, "required": ["next"]}},
                   "type": "object", "properties": {"head": {"$ref": "#/$defs/node"}}, "required": ["head"]}),
            "recursive",
        ),
        (
            json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}),
            "points nowhere",
        ),
        (
            json!({"$ref": "https://example.com/schema.json"}),
            "outside the schema",
        ),
        (json!(42), "object or a boolean"),
    ];
    for (schema, needle) in &refused {
        let body = json!({
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        });
        assert_refused(addr, &body, "response_format", needle);
        for tool_choice in [json!("required"), json!("auto"), named("walk")] {
            let body = json!({
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20,
                "tools": [weather_tools()[0], {"type": "function", "function": {"name": "walk", "parameters": schema}}],
                "tool_choice": tool_choice,
            });
            let message = assert_refused(addr, &body, "tools", needle);
            assert!(message.contains("tools[1] (walk)"), "{message}");
        }
    }
}

/// Posts `body`, expects a 400 for `param` whose message contains `needle`; returns it.
fn assert_refused(addr: SocketAddr, body: &Value, param: &str, needle: &str) -> String {
    let r = post(addr, "/v1/chat/completions", body);
    assert_eq!(r.status, 400, "{body}: {}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], "unsupported_schema", "{v}");
    assert_eq!(v["error"]["param"], param, "{v}");
    let message = v["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains(needle), "{body}: {message}");
    assert!(!message.contains('\n'), "{message}");
    message
}

/// A bounded recursive schema is served: the answer validates.
#[test]
fn a_recursive_schema_is_unrolled_and_validates() {
    let addr = server();
    let schema = json!({"$defs": {"node": {"type": "object",
        "properties": {"value": {"type": "integer", "minimum": 0, "maximum": 9},
                       "next": {"$ref": "#/$defs/node"}},
        "required": ["value"]}}, "$ref": "#/$defs/node"});
    let body = json!({
        "messages": [{"role": "user", "content": "A linked list of three digits."}],
        "max_tokens": 200, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "list", "schema": schema}},
    });
    let r = post(addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    let value: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    validate(&schema, &schema, &value).unwrap_or_else(|e| panic!("{text}: {e}"));
}

/// A constrained answer cut by `max_tokens` says so, streamed or not.
#[test]
fn a_constrained_answer_cut_by_max_tokens_finishes_with_length() {
    let addr = server();
    let schema = json!({"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
                        "required": ["name", "city"]});
    let body = json!({
        "messages": [{"role": "user", "content": "Invent a person."}],
        "max_tokens": 4, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
    });
    let (chunks, plain) = streamed_and_plain(addr, &body);
    assert_eq!(plain["choices"][0]["finish_reason"], "length", "{plain}");
    let text = plain["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        text.starts_with('{') && serde_json::from_str::<Value>(text).is_err(),
        "{text}"
    );
    assert_eq!(plain["usage"]["completion_tokens"], 4);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(streamed_content(&chunks), text);
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
    validate(&schema, &schema, &value).unwrap_or_else(|e| panic!("{schema} {text}: {e}"));
}
