//! One numeric path: a request's greedy output and its logits (as log-probabilities of the top
//! tokens, at every step) are the same bits whether it runs alone or shares every forward pass
//! with seven others — prompt chunks and decode rows of other sequences in the same matmuls.

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::{json, Value};

/// The streamed text and every token's log-probabilities (chosen and top 5) of a greedy run.
fn greedy_with_logprobs(addr: SocketAddr, prompt: &str, max_tokens: usize) -> (String, Value) {
    let mut body = chat_body(prompt, max_tokens);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(5);
    let chunks = post_stream(addr, &body);
    let logprobs: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .flatten()
        .cloned()
        .collect();
    (streamed_content(&chunks), Value::Array(logprobs))
}

#[test]
fn a_request_alone_equals_the_same_request_batched_with_seven_others() {
    let _guard = serial();
    // Short prompts (decode rows soon) and long ones (several 64-token chunks while the others
    // decode), so passes mix prompt chunks and decode rows of different lengths.
    let long = "Here is a list of things found in an old kitchen drawer: string, a candle, \
        two keys, a broken watch, a pencil stub, some coins from another country, a rubber \
        band, a recipe for plum cake written in faded ink, a magnifying glass, and a small \
        photograph of a lighthouse. ";
    let prompts: Vec<String> = vec![
        "Name a fruit.".into(),
        format!("{long}Which of these could tell the time once?"),
        "What is 7 times 6?".into(),
        "Write one word that rhymes with moon.".into(),
        format!("{long}{long}Which item is the oldest?"),
        "Say good morning in Spanish.".into(),
        format!("{long}What would you bake?"),
        "Name a river in Europe.".into(),
    ];
    let max_tokens = 8;
    // Alone: one request at a time on a fresh server.
    let alone_server = start_server(8, 16);
    let alone: Vec<(String, Value)> = prompts
        .iter()
        .map(|p| greedy_with_logprobs(alone_server.addr, p, max_tokens))
        .collect();
    drop(alone_server);
    // Together: all eight at once on another fresh server (no prefix cache to draw on).
    let server = start_server(8, 16);
    let addr = server.addr;
    let steps_before = metric(addr, "gemma_forward_steps_total");
    let together: Vec<(String, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(move || greedy_with_logprobs(addr, p, max_tokens)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let steps = metric(addr, "gemma_forward_steps_total") - steps_before;
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert!(
            a.1.as_array().is_some_and(|l| !l.is_empty()),
            "prompt {i}: no logprobs"
        );
        assert_eq!(a, b, "prompt {i}: {:?}", prompts[i]);
    }
    // The requests did share passes: far fewer than the one per chunk or token a serial run
    // takes.
    let serial_steps = (8 * max_tokens) as f64;
    assert!(
        steps < serial_steps / 2.0,
        "{steps} forward passes for 8 requests of {max_tokens} tokens"
    );
}
