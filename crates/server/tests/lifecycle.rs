//! Per-request timeout and graceful shutdown (the path SIGTERM takes).

mod common;

use std::io::{BufRead, BufReader};
use std::time::Duration;

use common::*;
use gemma_server::ServerConfig;
use serde_json::json;

#[test]
fn a_request_past_its_timeout_gets_504_and_frees_the_slot() {
    let server = start_server_with(ServerConfig {
        port: 0,
        parallel: 1,
        ctx_size: 1024,
        request_timeout: Duration::from_millis(1500),
        ..ServerConfig::default()
    });
    let body = json!({
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 900, "temperature": 0,
    });
    let r = post(server.addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "timeout");
    assert_eq!(metric(server.addr, "gemma_active_slots"), 0.0);
}

#[test]
fn shutdown_finishes_in_flight_streams() {
    let server = start_server_with_context(1, 4, 512);
    let addr = server.addr;
    let mut stream = connect(addr);
    let body = json!({
        "messages": [{"role": "user", "content": "Count to ten."}],
        "max_tokens": 12, "temperature": 0, "stream": true,
    });
    send_request(
        &mut stream,
        "POST",
        "/v1/chat/completions",
        Some(&serde_json::to_vec(&body).unwrap()),
    );
    let mut reader = BufReader::new(stream);
    let (status, _) = read_head(&mut reader);
    assert_eq!(status, 200);
    let stopper = std::thread::spawn(move || server.stop());
    let mut rest = String::new();
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        rest.push_str(&line);
        line.clear();
    }
    assert!(rest.contains("data: [DONE]"), "the stream was cut: {rest}");
    stopper.join().unwrap().expect("clean shutdown");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still listening"
    );
}
