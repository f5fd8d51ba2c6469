//! The prefix cache with a prompt longer than the model's 512-token sliding window: once the
//! window's ring has moved past what a rewind needs, the cache is not reused and the output
//! still equals an uncached run; a prefix the ring still holds is reused.

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::json;

fn complete(addr: SocketAddr, prompt: &str, max_tokens: usize) -> String {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
    let r = post(addr, "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["choices"][0]["text"].as_str().unwrap().to_owned()
}

#[test]
fn rewinding_past_the_sliding_window_falls_back_to_a_full_run() {
    let server = start_server_with_context(1, 4, 2048);
    let addr = server.addr;
    let story: String = (0..90)
        .map(|i| format!("Line {i} of the long ledger. "))
        .collect();
    let prompt = format!("{story}The ledger ends with");
    let cold = complete(addr, &prompt, 4);

    // Same prompt again: the slot holds it plus 3 generated tokens, and the window layers'
    // rings no longer hold the position a rewind would need, so nothing is reused.
    let hits = metric(addr, "gemma_prefix_cache_hit_tokens_total");
    let again = complete(addr, &prompt, 4);
    assert_eq!(metric(addr, "gemma_prefix_cache_hit_tokens_total"), hits);
    assert_eq!(again, cold);

    // Prompt-only run (max_tokens 1 leaves exactly the prompt body cached, nothing past it),
    // then the same prompt: the ring still covers the rewind, so almost all of it is reused.
    complete(addr, &prompt, 1);
    let hits = metric(addr, "gemma_prefix_cache_hit_tokens_total");
    let warm = complete(addr, &prompt, 4);
    let reused = metric(addr, "gemma_prefix_cache_hit_tokens_total") - hits;
    assert!(reused > 500.0, "reused {reused}");
    assert_eq!(warm, cold);
}
