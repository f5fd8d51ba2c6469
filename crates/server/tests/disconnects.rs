//! Clients that vanish mid-stream under load: their slots are freed at once, their sequences
//! stop decoding, and the one client left is served as if it were alone (the "slow stream
//! after disconnects" report: 7 of 8 streams dropped, the last took 65 s for 400 tokens).

mod common;

use std::io::BufRead;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SURVIVOR: &str = "Write a long story about a lighthouse keeper.";
const MAX_TOKENS: usize = 300;

fn survivor_body() -> Value {
    let mut body = chat_body(SURVIVOR, MAX_TOKENS);
    body["stream_options"] = json!({"include_usage": true});
    body
}

/// The content and the usage chunk of what is left of a stream, and the data lines read.
fn finish(reader: &mut impl BufRead) -> (String, Value, usize) {
    let rest = read_rest(reader);
    let chunks: Vec<Value> = rest
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("chunk {d}: {e}")))
        .collect();
    assert!(
        rest.contains("data: [DONE]"),
        "the stream did not end properly"
    );
    let usage = chunks
        .iter()
        .find(|c| !c["usage"].is_null())
        .map(|c| c["usage"].clone())
        .expect("a usage chunk");
    (streamed_content(&chunks), usage, chunks.len())
}

#[test]
fn dropping_seven_of_eight_streams_leaves_the_last_one_at_full_speed() {
    let server = start_server(8, 16);
    let addr = server.addr;

    // The survivor's request alone, for its text and its time.
    let started = Instant::now();
    let mut alone = open_stream(addr, &survivor_body(), 1);
    let (alone_text, alone_usage, _) = finish(&mut alone);
    let alone_secs = started.elapsed().as_secs_f64();
    let alone_tokens = alone_usage["completion_tokens"].as_u64().unwrap();
    assert!(alone_tokens > 100, "{alone_usage}");

    // Eight streams at once; seven of them go away after a few tokens.
    let mut droppers: Vec<_> = (0..7)
        .map(|i| {
            let prompt = format!("Count slowly from {} to one thousand, in words.", i * 10);
            open_stream(addr, &chat_body(&prompt, 400), 2)
        })
        .collect();
    let mut survivor = open_stream(addr, &survivor_body(), 2);
    assert_eq!(metric(addr, "gemma_active_slots"), 8.0);
    let cancelled = metric(addr, "gemma_requests_cancelled_total");
    let tokens_before = metric(addr, "gemma_completion_tokens_total");
    droppers.clear();
    let dropped_at = Instant::now();

    // Every dropped sequence is noticed and its slot freed.
    wait_for_metric(addr, "gemma_requests_cancelled_total", |v| {
        v >= cancelled + 7.0
    });
    wait_for_metric(addr, "gemma_active_slots", |v| v <= 1.0);

    let (rest_text, usage, chunks_after) = finish(&mut survivor);
    let after_secs = dropped_at.elapsed().as_secs_f64();
    // Greedy decoding in a batch equals decoding alone (the scheduler test shows it in
    // general); here the survivor's whole answer is the alone answer.
    assert_eq!(usage["completion_tokens"], alone_usage["completion_tokens"]);
    assert!(
        alone_text.ends_with(&rest_text),
        "{alone_text:?} vs {rest_text:?}"
    );

    // The dropped sequences stopped decoding: after the drop, the server generated the
    // survivor's remaining tokens and at most a few per dropped client (those in flight when
    // the disconnect was noticed), not 7 more streams' worth.
    let generated_after = metric(addr, "gemma_completion_tokens_total") - tokens_before;
    let survivor_after = chunks_after as f64;
    assert!(
        generated_after <= survivor_after + 7.0 * 16.0,
        "{generated_after} tokens generated after the drop, {survivor_after} of them for the \
         client still connected"
    );
    // And the survivor was not starved: its remaining tokens came at least about as fast as
    // alone (a generous bound: this is a liveness check, not a benchmark).
    let bound = Duration::from_secs_f64(alone_secs * 4.0 + 10.0);
    assert!(
        Duration::from_secs_f64(after_secs) < bound,
        "the last stream took {after_secs:.1} s after the others left ({alone_secs:.1} s alone)"
    );
}
