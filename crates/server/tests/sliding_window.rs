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

/// The prompt store (`--cache-ram`) keeps a long prompt's prefix from before its reply moved
/// the window's ring: the same prompt later reuses all but its last chunk, with the same output
/// as the uncached run; a store too small for two such prompts keeps the latest one.
#[test]
fn the_prompt_store_serves_a_long_prompt_after_its_slot_moved_on() {
    let story: String = (0..90)
        .map(|i| format!("Line {i} of the long ledger. "))
        .collect();
    let prompt = format!("{story}The ledger ends with");
    let other = format!("{}The ledger ends with", story.replace("ledger", "logbook"));

    let uncached = start_server_with_context(1, 4, 2048);
    let cold = complete(uncached.addr, &prompt, 4);
    let cold_other = complete(uncached.addr, &other, 4);
    drop(uncached);

    let stored = |budget: usize| {
        start_server_with(gemma_server::ServerConfig {
            port: 0,
            parallel: 1,
            ctx_size: 2048,
            queue_capacity: 4,
            prompt_cache_bytes: budget,
            ..gemma_server::ServerConfig::default()
        })
    };
    let server = stored(64 << 20);
    let addr = server.addr;
    assert_eq!(complete(addr, &prompt, 4), cold);
    assert_eq!(metric(addr, "gemma_prompt_store_inserts_total"), 1.0);
    let bytes = metric(addr, "gemma_prompt_store_bytes");
    assert!(bytes > 0.0);
    // The slot's rings moved past the prompt while answering; the snapshot did not.
    let restored = metric(addr, "gemma_prompt_store_restored_tokens_total");
    let hits = metric(addr, "gemma_prefix_cache_hit_tokens_total");
    assert_eq!(complete(addr, &prompt, 4), cold);
    let from_store = metric(addr, "gemma_prompt_store_restored_tokens_total") - restored;
    assert!(from_store > 500.0, "restored {from_store}");
    assert_eq!(
        metric(addr, "gemma_prefix_cache_hit_tokens_total") - hits,
        from_store
    );
    // Already stored: not copied again.
    assert_eq!(metric(addr, "gemma_prompt_store_inserts_total"), 1.0);
    // Another long prompt (its first tokens shared) is computed and stored beside it.
    assert_eq!(complete(addr, &other, 4), cold_other);
    assert_eq!(metric(addr, "gemma_prompt_store_entries"), 2.0);
    drop(server);

    // Room for one snapshot only: the second evicts the first.
    let server = stored(bytes as usize + (bytes as usize) / 2);
    let addr = server.addr;
    complete(addr, &prompt, 4);
    complete(addr, &other, 4);
    assert_eq!(metric(addr, "gemma_prompt_store_entries"), 1.0);
    let restored = metric(addr, "gemma_prompt_store_restored_tokens_total");
    assert_eq!(complete(addr, &prompt, 4), cold);
    assert_eq!(
        metric(addr, "gemma_prompt_store_restored_tokens_total"),
        restored,
        "evicted"
    );
    assert_eq!(complete(addr, &other, 4), cold_other, "after the eviction");
}
