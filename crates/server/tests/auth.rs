//! `--api-key` and `--metrics-key`: a missing or wrong Bearer key is a 401 in OpenAI's error
//! shape; `/health` stays open, and `/metrics` too unless it has its own key.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::SocketAddr;

use common::*;
use gemma_server::ServerConfig;
use serde_json::Value;

/// Status and body of a request carrying `authorization` (if any) as its Bearer key.
fn send(addr: SocketAddr, method: &str, path: &str, key: Option<&str>) -> (u16, String) {
    let body = serde_json::to_vec(&chat_body("Hi", 1)).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(key) = key {
        head.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    if method == "POST" {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut stream = connect(addr);
    stream.write_all(head.as_bytes()).unwrap();
    if method == "POST" {
        stream.write_all(&body).unwrap();
    }
    let mut reader = BufReader::new(stream);
    let (status, _) = read_head(&mut reader);
    let mut text = String::new();
    reader.read_to_string(&mut text).unwrap();
    (status, text)
}

#[test]
fn keys_guard_the_api_and_optionally_the_metrics() {
    let server = start_server_with(ServerConfig {
        port: 0,
        parallel: 1,
        ctx_size: 512,
        api_key: Some("s3cret-key".into()),
        metrics_key: Some("metrics-key".into()),
        ..ServerConfig::default()
    });
    let addr = server.addr;
    let chat = "/v1/chat/completions";
    for key in [
        None,
        Some("wrong"),
        Some("s3cret-ke"),
        Some("s3cret-key2"),
        Some(""),
    ] {
        let (status, body) = send(addr, "POST", chat, key);
        assert_eq!(status, 401, "key {key:?}: {body}");
        assert!(body.contains("API key"), "{body}");
    }
    assert_eq!(send(addr, "GET", "/v1/models", None).0, 401);
    assert_eq!(send(addr, "POST", chat, Some("s3cret-key")).0, 200);
    assert_eq!(send(addr, "GET", "/v1/models", Some("s3cret-key")).0, 200);
    assert_eq!(send(addr, "GET", "/health", None).0, 200);
    // The metrics key, not the API key, opens /metrics.
    assert_eq!(send(addr, "GET", "/metrics", None).0, 401);
    assert_eq!(send(addr, "GET", "/metrics", Some("s3cret-key")).0, 401);
    let (status, text) = send(addr, "GET", "/metrics", Some("metrics-key"));
    assert_eq!(status, 200);
    assert!(text.contains("gemma_"), "{text}");
    server.stop().unwrap();
}

#[test]
fn without_a_metrics_key_metrics_stay_open() {
    let server = start_server_with(ServerConfig {
        port: 0,
        parallel: 1,
        ctx_size: 512,
        api_key: Some("k".into()),
        ..ServerConfig::default()
    });
    let (status, _) = send(server.addr, "GET", "/metrics", None);
    assert_eq!(status, 200);
    let (status, body) = send(server.addr, "POST", "/v1/chat/completions", None);
    assert_eq!(status, 401);
    let json: Value = serde_json::from_str(body.trim()).unwrap_or(Value::Null);
    assert_eq!(json["error"]["type"], "invalid_request_error", "{body}");
    server.stop().unwrap();
}
