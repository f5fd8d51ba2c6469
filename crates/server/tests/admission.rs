//! One slot, a queue of one: a client that disconnects frees its slot at once, and a full
//! queue answers 429 instead of waiting.

mod common;

use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;

use common::*;
use gemma_server::RunningServer;
use serde_json::json;

fn server() -> SocketAddr {
    static SERVER: OnceLock<RunningServer> = OnceLock::new();
    SERVER.get_or_init(|| start_server(1, 1)).addr
}

/// A long streaming request, returned once its first token arrived (it holds the slot).
fn open_long_stream(addr: SocketAddr) -> BufReader<TcpStream> {
    let body = chat_body("Write a very long story about a dragon.", 400);
    open_stream(addr, &body, 2)
}

#[test]
fn disconnecting_frees_the_slot() {
    let _guard = serial();
    let addr = server();
    let cancelled = metric(addr, "gemma_requests_cancelled_total");
    let tokens_before = metric(addr, "gemma_completion_tokens_total");
    let stream = open_long_stream(addr);
    assert_eq!(metric(addr, "gemma_active_slots"), 1.0);
    drop(stream);
    wait_for_metric(addr, "gemma_requests_cancelled_total", |v| {
        v >= cancelled + 1.0
    });
    wait_for_metric(addr, "gemma_active_slots", |v| v == 0.0);
    // It stopped long before its 400 tokens, and the one slot serves the next request.
    assert!(metric(addr, "gemma_completion_tokens_total") - tokens_before < 100.0);
    let r = post(addr, "/v1/chat/completions", &chat_body("Hi", 2));
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_full_queue_answers_429() {
    let _guard = serial();
    let addr = server();
    let running = open_long_stream(addr);
    // The second request waits in the queue (capacity 1)...
    let mut waiting = connect(addr);
    let body = json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 400, "stream": true});
    send_request(
        &mut waiting,
        "POST",
        "/v1/chat/completions",
        Some(&serde_json::to_vec(&body).unwrap()),
    );
    wait_for_metric(addr, "gemma_queue_depth", |v| v == 1.0);
    // ...so a third is refused at once.
    let r = post(addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "queue_full");
    assert!(metric(addr, "gemma_requests_rejected_total") >= 1.0);
    drop(running);
    drop(waiting);
    wait_for_metric(addr, "gemma_active_slots", |v| v == 0.0);
    wait_for_metric(addr, "gemma_queue_depth", |v| v == 0.0);
}
