//! Per-request timeout and graceful shutdown (the path SIGTERM takes).

mod common;

use std::time::Duration;

use common::*;
use gemma_server::ServerConfig;

#[test]
fn a_request_past_its_timeout_gets_504_and_frees_the_slot() {
    let server = start_server_with(ServerConfig {
        port: 0,
        parallel: 1,
        ctx_size: 1024,
        request_timeout: Duration::from_millis(1500),
        ..ServerConfig::default()
    });
    let body = chat_body("Write a very long story.", 900);
    let r = post(server.addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "timeout");
    assert_eq!(metric(server.addr, "gemma_active_slots"), 0.0);
}

#[test]
fn shutdown_finishes_in_flight_streams() {
    let server = start_server_with_context(1, 4, 512);
    let addr = server.addr;
    let mut reader = open_stream(addr, &chat_body("Count to ten.", 12), 1);
    let stopper = std::thread::spawn(move || server.stop());
    let rest = read_rest(&mut reader);
    assert!(rest.contains("data: [DONE]"), "the stream was cut: {rest}");
    stopper.join().unwrap().expect("clean shutdown");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still listening"
    );
}
