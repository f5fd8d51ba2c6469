//! Continuous batching and the prefix cache, against the real model: concurrent greedy
//! streams equal solo runs, and a repeated or shared prompt prefix is reused (visible in
//! /metrics) without changing the output.

mod common;

use std::net::SocketAddr;
use std::sync::OnceLock;

use common::*;
use gemma_server::RunningServer;
use serde_json::{json, Value};

fn server() -> SocketAddr {
    static SERVER: OnceLock<RunningServer> = OnceLock::new();
    SERVER.get_or_init(|| start_server(4, 16)).addr
}

/// A greedy streamed answer: its text and usage.
fn greedy_stream(addr: SocketAddr, prompt: &str, max_tokens: usize) -> (String, Value) {
    let mut body = chat_body(prompt, max_tokens);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = post_stream(addr, &body);
    let usage = chunks.last().unwrap()["usage"].clone();
    (streamed_content(&chunks), usage)
}

/// `prompts` sent all at once (one client thread each), answers in prompt order.
fn greedy_streams_at_once(
    addr: SocketAddr,
    prompts: &[String],
    max_tokens: usize,
) -> Vec<(String, Value)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(move || greedy_stream(addr, p, max_tokens)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Overwrites every slot's cache (four requests at once on the four slots), so the next
/// run starts cold.
fn fill_slots_with_unrelated_prompts(addr: SocketAddr) {
    std::thread::scope(|s| {
        for p in ["One.", "Two.", "Three.", "Four."] {
            s.spawn(move || greedy_stream(addr, p, 2));
        }
    });
}

/// Longer than one prefill chunk, so different questions after it share the first chunk.
const PREAMBLE: &str = "You are a meticulous librarian in the old town of Brackenford, a place of \
    narrow streets, tall chimneys and a river that floods every spring. The library has three \
    floors: novels on the first, history and maps on the second, and poetry under the roof. \
    Visitors are often confused, so you are patient with them. Answer every question in one \
    short sentence, politely. ";

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
    let together = greedy_streams_at_once(addr, &prompts, 6);
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

/// Prompts longer than one prefill chunk, sent together: their chunks share forward passes on
/// the GEMM path (the scheduler's `plan_passes`), which must not change any output.
#[test]
fn concurrent_long_prompts_equal_solo_runs() {
    let _guard = serial();
    let addr = server();
    // Distinct from the first token, so no prompt reuses another's prefix.
    let prompts: Vec<String> = ["Ada", "Bea", "Cyd", "Dov"]
        .iter()
        .map(|name| format!("My name is {name}. {PREAMBLE}Which floor has the maps?"))
        .collect();
    let mut solo = Vec::new();
    for p in &prompts {
        fill_slots_with_unrelated_prompts(addr);
        solo.push(greedy_stream(addr, p, 6));
    }
    fill_slots_with_unrelated_prompts(addr);
    let hits_before = metric(addr, "gemma_prefix_cache_hit_tokens_total");
    let together = greedy_streams_at_once(addr, &prompts, 6);
    let reused = metric(addr, "gemma_prefix_cache_hit_tokens_total") - hits_before;
    // At most the chat header each (shared with the unrelated prompts and with each other).
    assert!(reused < 40.0, "expected cold prompts, reused {reused}");
    for (i, (alone, batched)) in solo.iter().zip(&together).enumerate() {
        assert!(
            alone.1["prompt_tokens"].as_f64().unwrap() > 84.0,
            "prompt {i} should span more than one prefill chunk"
        );
        assert_eq!(alone, batched, "prompt {i}");
    }
}

#[test]
fn prefix_cache_reuses_a_shared_prompt_without_changing_output() {
    let _guard = serial();
    let addr = server();
    let shared = PREAMBLE;
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
    // Same answer as on a slot that has never seen the preamble.
    fill_slots_with_unrelated_prompts(addr);
    let hits_before = metric(addr, "gemma_prefix_cache_hit_tokens_total");
    let cold_second = greedy_stream(addr, &second, 5);
    let reused_cold = metric(addr, "gemma_prefix_cache_hit_tokens_total") - hits_before;
    assert!(
        reused_cold < 10.0,
        "expected a cold run, reused {reused_cold}"
    );
    assert_eq!(warm_second, cold_second);
}

#[test]
fn a_busy_slot_lends_its_prefix_to_a_request_on_another_slot() {
    let _guard = serial();
    let addr = server();
    fill_slots_with_unrelated_prompts(addr);
    // A long answer keeps one slot busy with the preamble in its cache...
    let busy_body = chat_body(&format!("{PREAMBLE}Tell me a very long story."), 300);
    let busy = open_stream(addr, &busy_body, 2);
    let copies = metric(addr, "gemma_prefix_cache_copies_total");
    let copied = metric(addr, "gemma_prefix_cache_copied_tokens_total");
    let hits = metric(addr, "gemma_prefix_cache_hit_tokens_total");
    // ...so a new question after the same preamble, on a free slot that never saw it,
    // starts from a copy of the busy slot's cache.
    let question = format!("{PREAMBLE}Where are the maps?");
    let warm = greedy_stream(addr, &question, 5);
    assert_eq!(
        metric(addr, "gemma_prefix_cache_copies_total"),
        copies + 1.0
    );
    let copied = metric(addr, "gemma_prefix_cache_copied_tokens_total") - copied;
    assert!(copied >= 60.0, "copied {copied} tokens");
    assert_eq!(
        metric(addr, "gemma_prefix_cache_hit_tokens_total") - hits,
        copied
    );
    drop(busy);
    wait_for_metric(addr, "gemma_active_slots", |v| v == 0.0);

    // The same answer as a cold run.
    fill_slots_with_unrelated_prompts(addr);
    let hits = metric(addr, "gemma_prefix_cache_hit_tokens_total");
    let cold = greedy_stream(addr, &question, 5);
    let reused = metric(addr, "gemma_prefix_cache_hit_tokens_total") - hits;
    assert!(reused < 10.0, "expected a cold run, reused {reused}");
    assert_eq!(warm, cold);
}
