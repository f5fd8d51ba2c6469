//! Continuous batching and the prefix cache, against the real model: concurrent greedy
//! streams equal solo runs, and a repeated or shared prompt prefix is reused (visible in
//! /metrics) without changing the output.

mod common;

use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

use common::*;
use gemma_server::RunningServer;
use serde_json::{json, Value};

fn server() -> SocketAddr {
    static SERVER: OnceLock<RunningServer> = OnceLock::new();
    SERVER.get_or_init(|| start_server(4, 16)).addr
}

/// The tests read global counters; one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn greedy_stream(addr: SocketAddr, prompt: &str, max_tokens: usize) -> (String, Value) {
    let body = json!({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true},
    });
    let r = post(addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let usage = chunks.last().unwrap()["usage"].clone();
    (streamed_content(&chunks), usage)
}

#[test]
fn concurrent_greedy_streams_equal_solo_runs() {
    let _guard = serial();
    let addr = server();
    let prompts: Vec<String> = [
        "Name a fruit.",
        "What is 2 + 2?",
        "Say hello in French.",
        "Name a planet.",
        "What color is the sky?",
        "Write a word that rhymes with cat.",
        "Name an ocean.",
        "What do bees make?",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let solo: Vec<(String, Value)> = prompts.iter().map(|p| greedy_stream(addr, p, 6)).collect();
    let steps_before = metric(addr, "gemma_forward_steps_total");
    let together: Vec<(String, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(move || greedy_stream(addr, p, 6)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let steps = metric(addr, "gemma_forward_steps_total") - steps_before;
    for (i, (alone, batched)) in solo.iter().zip(&together).enumerate() {
        assert_eq!(alone, batched, "prompt {i}: {:?}", prompts[i]);
    }
    // Sharing forward passes: far fewer steps than the 8 × (prefill + 6) a serial run takes.
    let generated: f64 = together
        .iter()
        .map(|(_, u)| u["completion_tokens"].as_f64().unwrap())
        .sum();
    assert!(steps < generated, "{steps} steps for {generated} tokens");
}

#[test]
fn prefix_cache_reuses_a_shared_prompt_without_changing_output() {
    let _guard = serial();
    let addr = server();
    // Longer than one prefill chunk, so a different question can reuse the first chunk.
    let shared = "You are a meticulous librarian in the old town of Brackenford, a place of \
                  narrow streets, tall chimneys and a river that floods every spring. The \
                  library has three floors: novels on the first, history and maps on the \
                  second, and poetry under the roof. Visitors are often confused, so you are \
                  patient with them. Answer every question in one short sentence, politely. ";
    let first = format!("{shared}Which book should I read first?");
    let cold = greedy_stream(addr, &first, 5);
    let hits_before = metric(addr, "gemma_prefix_cache_hit_tokens_total");
    let warm = greedy_stream(addr, &first, 5);
    let reused = metric(addr, "gemma_prefix_cache_hit_tokens_total") - hits_before;
    assert_eq!(cold, warm, "a cache hit must not change the output");
    let prompt_tokens = cold.1["prompt_tokens"].as_f64().unwrap();
    assert_eq!(
        reused,
        prompt_tokens - 1.0,
        "all but the last prompt token reused"
    );

    // A different question after the same preamble reuses the preamble.
    let second = format!("{shared}Where is the poetry shelf?");
    let hits_before = metric(addr, "gemma_prefix_cache_hit_tokens_total");
    let warm_second = greedy_stream(addr, &second, 5);
    let reused = metric(addr, "gemma_prefix_cache_hit_tokens_total") - hits_before;
    assert!(
        reused >= 60.0,
        "the shared preamble should be reused, got {reused}"
    );
    // Same answer as on a slot that has never seen the preamble: fill every slot with
    // unrelated prompts first so the next run starts cold.
    std::thread::scope(|s| {
        for p in ["One.", "Two.", "Three.", "Four."] {
            s.spawn(move || greedy_stream(addr, p, 2));
        }
    });
    let hits_before = metric(addr, "gemma_prefix_cache_hit_tokens_total");
    let cold_second = greedy_stream(addr, &second, 5);
    let reused_cold = metric(addr, "gemma_prefix_cache_hit_tokens_total") - hits_before;
    assert!(
        reused_cold < 10.0,
        "expected a cold run, reused {reused_cold}"
    );
    assert_eq!(warm_second, cold_second);
}
