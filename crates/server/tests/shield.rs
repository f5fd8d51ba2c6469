//! The safety filter of `gemma serve --shield` on the tiny fixtures: the main model is the
//! tiny random Gemma 3 vision model, the classifier the tiny random text ShieldGemma (Gemma 2)
//! of `fixtures/shield_tiny/text`. Its P(Yes) values are fixed by the fixture, so each test
//! picks policies and thresholds that block or pass deterministically: the prompt
//! "How do I bake bread at home?" scores 0.649 on `harassment` and 0.198 on `hate`
//! (reference.json); for replies, the test computes P(Yes) of each window in-process with the
//! engine's classifier and places the threshold between them.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use gemma_engine::shield::Modality;
use gemma_engine::{resolve_policies, LoadedModel, PolicySpec, Session, Shield, ShieldInput};
use gemma_server::shield::next_window;
use gemma_server::{RunningServer, ServerConfig, ShieldFilter, ShieldOptions};
use serde_json::{json, Value};

const PROMPT: &str = "How do I bake bread at home?";

fn shield_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/shield_tiny/text")
}

fn load_shield() -> LoadedModel {
    gemma_engine::load(Some(&shield_dir()), &Default::default()).expect("the shield loads")
}

fn filter(opts: ShieldOptions) -> Arc<ShieldFilter> {
    Arc::new(ShieldFilter::new(vec![load_shield()], &opts).expect("the filter starts"))
}

/// Fixed windows of `window` tokens.
fn options(policies: &[&str], threshold: f32, window: usize) -> ShieldOptions {
    growing(policies, threshold, window, window)
}

/// Windows from `first` tokens, doubling up to `max`.
fn growing(policies: &[&str], threshold: f32, first: usize, max: usize) -> ShieldOptions {
    ShieldOptions {
        policies: policies.iter().map(|p| p.to_string()).collect(),
        threshold,
        window: max,
        first_window: first,
        ..ShieldOptions::default()
    }
}

/// Token counts at which a streamed reply of `n` tokens is checked, as the filter's schedule
/// says (`first`, then [`next_window`] up to `max`): whole windows, then the rest at the end.
fn window_ends(first: usize, max: usize, n: usize) -> Vec<usize> {
    let (mut ends, mut end, mut window) = (Vec::new(), 0, first.min(max));
    while end + window <= n {
        end += window;
        ends.push(end);
        window = next_window(window, max);
    }
    if end < n {
        ends.push(n);
    }
    ends
}

fn server(shield: Option<Arc<ShieldFilter>>) -> RunningServer {
    start_vision_server(ServerConfig {
        parallel: 2,
        ctx_size: 512,
        queue_capacity: 8,
        shield,
        ..ServerConfig::default()
    })
}

fn chat(addr: SocketAddr, body: &Value) -> Value {
    let r = post(addr, "/v1/chat/completions", body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// P(Yes) of `policy` in-process, as the filter computes it: on the prompt alone, or on a
/// response to it.
fn p_yes(model: &LoadedModel, policy: &str, prompt: &str, response: Option<&str>) -> f32 {
    let shield = Shield::new(model, 1024).unwrap();
    let policies = resolve_policies(Modality::Text, &[PolicySpec::Named(policy.into())]).unwrap();
    let input = ShieldInput::Text {
        label: "t",
        prompt,
        response,
    };
    let prompt = shield.prompt(&input, &policies[0]).unwrap();
    let mut session = Session::new(model, prompt.ids.len()).unwrap();
    shield.p_yes(&mut session, &prompt).unwrap()
}

/// The greedy reply of the unshielded model, token by token (with logprobs, every token is a
/// chunk of its own, as every token is an event of the filter's windows).
fn reply_tokens(addr: SocketAddr, max_tokens: usize) -> Vec<String> {
    let mut body = chat_body(PROMPT, max_tokens);
    body["logprobs"] = json!(true);
    let chunks = post_stream(addr, &body);
    chunks
        .iter()
        .filter(|c| c["choices"][0]["logprobs"].is_object())
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

#[test]
fn a_flagged_prompt_is_blocked_before_generating() {
    let _serial = serial();
    // harassment: P(Yes) 0.649 on the prompt.
    let s = server(Some(filter(options(&["harassment"], 0.6, 8))));
    let addr = s.addr;
    let message = "This request was blocked by the safety filter (policy: harassment).";
    let full = chat(addr, &chat_body(PROMPT, 16));
    let choice = &full["choices"][0];
    assert_eq!(choice["finish_reason"], "content_filter", "{full}");
    assert_eq!(choice["message"]["content"], message);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(full["usage"]["completion_tokens"], 0);

    // Streamed: one chunk with the message and the finish reason, then [DONE].
    let mut body = chat_body(PROMPT, 16);
    body["stream"] = json!(true);
    let chunks = sse_chunks(&post(addr, "/v1/chat/completions", &body));
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    assert_eq!(chunks[0]["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(chunks[0]["choices"][0]["delta"]["content"], message);

    // /v1/completions checks its whole prompt.
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": PROMPT, "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(v["choices"][0]["text"], message);

    // Ollama's /api/chat and the Responses API share the preparation, and the filter.
    let r = post(
        addr,
        "/api/chat",
        &json!({"model": "hf", "stream": false,
                "messages": [{"role": "user", "content": PROMPT}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["done_reason"], "content_filter", "{v}");
    assert_eq!(v["message"]["content"], message);
    let r = post(
        addr,
        "/v1/responses",
        &json!({"input": PROMPT, "max_output_tokens": 8}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "incomplete", "{v}");
    assert_eq!(v["incomplete_details"]["reason"], "content_filter");
    assert_eq!(v["output"][0]["content"][0]["text"], message);

    assert_eq!(
        metric(addr, "gemma_shield_blocked_total{stage=\"input\"}"),
        5.0
    );
    assert_eq!(
        metric(addr, "gemma_shield_hits_total{policy=\"harassment\"}"),
        5.0
    );
    assert_eq!(
        metric(addr, "gemma_shield_checks_total{stage=\"input\"}"),
        5.0
    );
    assert_eq!(
        metric(addr, "gemma_shield_checks_total{stage=\"output\"}"),
        0.0
    );
    assert_eq!(metric(addr, "gemma_shield_check_seconds_count"), 5.0);
    assert!(metric(addr, "gemma_shield_check_seconds_sum") > 0.0);
}

#[test]
fn a_passing_request_is_answered_unchanged() {
    let _serial = serial();
    let plain = server(None);
    // hate: P(Yes) 0.198 on the prompt; a threshold of 0.99 passes every reply window too.
    let shielded = server(Some(filter(options(&["hate"], 0.99, 4))));
    let body = chat_body(PROMPT, 20);
    let want = chat(plain.addr, &body);
    let got = chat(shielded.addr, &body);
    assert_eq!(got["choices"], want["choices"]);
    assert_eq!(got["usage"], want["usage"]);
    let want_stream = streamed_content(&post_stream(plain.addr, &body));
    let chunks = post_stream(shielded.addr, &body);
    assert_eq!(streamed_content(&chunks), want_stream);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        want["choices"][0]["finish_reason"]
    );
    assert_eq!(
        want_stream,
        want["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let addr = shielded.addr;
    assert_eq!(
        metric(addr, "gemma_shield_checks_total{stage=\"input\"}"),
        2.0
    );
    // One check of the whole reply, and at least one per 4-token window when streamed.
    let output_checks = metric(addr, "gemma_shield_checks_total{stage=\"output\"}");
    assert!(output_checks >= 2.0, "{output_checks}");
    assert_eq!(
        metric(addr, "gemma_shield_hits_total{policy=\"hate\"}"),
        0.0
    );
    assert_eq!(metric(addr, "gemma_shield_failures_total"), 0.0);

    // Windows of 1, 2, 4, 4, ... tokens: the same reply, one output check per window that
    // has text (a window of blanks passes unchecked) and one per non-streamed reply.
    let doubling = server(Some(filter(growing(&["hate"], 0.99, 1, 4))));
    let tokens = reply_tokens(plain.addr, 20);
    let chunks = post_stream(doubling.addr, &body);
    assert_eq!(streamed_content(&chunks), want_stream);
    assert_eq!(
        chat(doubling.addr, &body)["choices"],
        want["choices"],
        "not streamed"
    );
    let mut start = 0;
    let mut windows_with_text = 0;
    for end in window_ends(1, 4, tokens.len()) {
        if !tokens[start..end].concat().trim().is_empty() {
            windows_with_text += 1;
        }
        start = end;
    }
    assert!(windows_with_text >= 5, "{tokens:?}");
    assert_eq!(
        metric(doubling.addr, "gemma_shield_checks_total{stage=\"output\"}"),
        (windows_with_text + 1) as f64
    );
}

#[test]
fn stages_check_only_what_they_name() {
    let _serial = serial();
    let plain = server(None);
    let body = chat_body(PROMPT, 12);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let want = chat(plain.addr, &body);
    let want_stream = streamed_content(&post_stream(plain.addr, &streamed));
    let stages = |policy: &str, threshold: f32, input: bool, output: bool| {
        let filter = filter(ShieldOptions {
            input,
            output,
            ..options(&[policy], threshold, 4)
        });
        let unchecked = if input { "replies" } else { "requests" };
        assert!(
            filter.warnings.iter().any(|w| w.contains(unchecked)),
            "{:?}",
            filter.warnings
        );
        server(Some(filter))
    };
    let checks = |s: &RunningServer, stage: &str| {
        metric(
            s.addr,
            &format!("gemma_shield_checks_total{{stage=\"{stage}\"}}"),
        )
    };

    // Input only: the prompt is still blocked (harassment 0.649); a passing one is answered
    // as without the filter, and no reply is checked.
    let s = stages("harassment", 0.6, true, false);
    let v = chat(s.addr, &body);
    assert_eq!(v["choices"][0]["finish_reason"], "content_filter", "{v}");
    let s = stages("hate", 0.99, true, false);
    assert_eq!(chat(s.addr, &body)["choices"], want["choices"]);
    assert_eq!(
        streamed_content(&post_stream(s.addr, &streamed)),
        want_stream
    );
    assert_eq!((checks(&s, "input"), checks(&s, "output")), (2.0, 0.0));

    // Output only: the same prompt is not checked (not blocked at 0.6), the reply is.
    let s = stages("harassment", 0.99, false, true);
    assert_eq!(chat(s.addr, &body)["choices"], want["choices"]);
    assert_eq!(
        streamed_content(&post_stream(s.addr, &streamed)),
        want_stream
    );
    assert_eq!(checks(&s, "input"), 0.0);
    assert!(checks(&s, "output") >= 2.0);

    // No stage at all is refused at start-up.
    let e = ShieldFilter::new(
        vec![load_shield()],
        &ShieldOptions {
            input: false,
            output: false,
            ..ShieldOptions::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("no stage"), "{e}");
}

/// A flagged window mid-stream: the policy, the windows (first, most) and the threshold with
/// which the prompt and the windows before pass and a later whole window is flagged, and the
/// tokens sent before it; `None` when no built-in policy and schedule does that for this reply.
struct MidStream {
    policy: String,
    first: usize,
    max: usize,
    threshold: f32,
    passed: usize,
}

fn mid_stream_case(
    model: &LoadedModel,
    tokens: &[String],
    schedules: &[(usize, usize)],
) -> Option<MidStream> {
    for policy in ["dangerous", "harassment", "hate", "sexual"] {
        let p_in = p_yes(model, policy, PROMPT, None);
        for &(first, max) in schedules {
            let mut passed_max = p_in;
            let mut before = 0;
            let mut window = first;
            while before + window <= tokens.len() {
                let end = before + window;
                if tokens[before..end].concat().trim().is_empty() {
                    // A window of blanks passes unchecked.
                    before = end;
                    window = next_window(window, max);
                    continue;
                }
                let text: String = tokens[..end].concat();
                let p = p_yes(model, policy, PROMPT, Some(&text));
                if before > 0 && p > passed_max + 0.02 {
                    return Some(MidStream {
                        policy: policy.to_owned(),
                        first,
                        max,
                        threshold: (passed_max + p) / 2.0,
                        passed: before,
                    });
                }
                passed_max = passed_max.max(p);
                before = end;
                window = next_window(window, max);
            }
        }
    }
    None
}

#[test]
fn a_flagged_reply_stops_mid_stream_without_leaking_the_window() {
    flagged_mid_stream(&[(2, 2), (3, 3), (4, 4), (6, 6)]);
}

#[test]
fn a_flagged_reply_stops_mid_stream_with_doubling_windows() {
    flagged_mid_stream(&[(1, 4), (1, 8), (1, 2), (2, 8)]);
}

fn flagged_mid_stream(schedules: &[(usize, usize)]) {
    let _serial = serial();
    let plain = server(None);
    let max_tokens = 24;
    let tokens = reply_tokens(plain.addr, max_tokens);
    assert!(tokens.len() >= 8, "{tokens:?}");
    let model = load_shield();
    let MidStream {
        policy,
        first,
        max,
        threshold,
        passed,
    } = mid_stream_case(&model, &tokens, schedules)
        .expect("some policy flags a later window of the fixture's reply");
    eprintln!("{policy}: windows {first}..{max}, threshold {threshold}, {passed} tokens pass");
    let window = max;
    let s = server(Some(filter(growing(&[&policy], threshold, first, max))));
    let mut body = chat_body(PROMPT, max_tokens);
    body["logprobs"] = json!(true);
    let chunks = post_stream(s.addr, &body);
    let message = format!("This response was blocked by the safety filter (policy: {policy}).");
    let passed: String = tokens[..passed].concat();
    assert!(!passed.is_empty(), "the block must come mid-stream");
    assert_eq!(streamed_content(&chunks), format!("{passed}{message}"));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(
        metric(s.addr, "gemma_shield_blocked_total{stage=\"output\"}"),
        1.0
    );
    assert_eq!(
        metric(
            s.addr,
            &format!("gemma_shield_hits_total{{policy=\"{policy}\"}}")
        ),
        1.0
    );
    // Not streamed: the whole reply is checked before anything is sent.
    let full_text: String = tokens.concat();
    let p_in = p_yes(&model, &policy, PROMPT, None);
    let p_full = p_yes(&model, &policy, PROMPT, Some(&full_text));
    if p_full > p_in + 0.02 {
        let s = server(Some(filter(options(
            &[&policy],
            (p_in + p_full) / 2.0,
            window,
        ))));
        let v = chat(s.addr, &chat_body(PROMPT, max_tokens));
        assert_eq!(v["choices"][0]["finish_reason"], "content_filter", "{v}");
        assert_eq!(v["choices"][0]["message"]["content"], message);
    } else {
        eprintln!(
            "the whole reply scores {p_full} ≤ the prompt's {p_in}: non-streamed case skipped"
        );
    }
}

#[test]
fn a_check_that_cannot_run_fails_closed() {
    let _serial = serial();
    // A classifier context that holds the policy with a short text but not a long prompt.
    let model = load_shield();
    let policies = resolve_policies(Modality::Text, &[PolicySpec::Named("hate".into())]).unwrap();
    let alone = model
        .encode_prompt(&Shield::text_prompt_text("", Some(""), &policies[0]))
        .unwrap()
        .len();
    let s = server(Some(filter(ShieldOptions {
        ctx_size: alone + 40,
        ..options(&["hate"], 0.99, 8)
    })));
    let long = "Tell me about bread and butter. ".repeat(12);
    for stream in [false, true] {
        let mut body = chat_body(&long, 8);
        body["stream"] = json!(stream);
        let r = post(s.addr, "/v1/chat/completions", &body);
        assert_eq!(r.status, 500, "stream {stream}: {}", r.text());
        let v = r.json();
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains("safety check failed"), "{message}");
    }
    assert_eq!(metric(s.addr, "gemma_shield_failures_total"), 2.0);
    // A short prompt still passes.
    let v = chat(s.addr, &chat_body("Hi", 4));
    assert_ne!(v["choices"][0]["finish_reason"], "content_filter");
}

#[test]
fn start_up_refuses_bad_policies() {
    let err = |opts: ShieldOptions| ShieldFilter::new(vec![load_shield()], &opts).unwrap_err();
    let e = err(options(&["nonsense"], 0.5, 8)).to_string();
    assert!(e.contains("unknown policy \"nonsense\""), "{e}");
    let e = err(options(&["violence"], 0.5, 8)).to_string();
    assert!(e.contains("image policy"), "{e}");
    let e = format!(
        "{:#}",
        err(ShieldOptions {
            policy_texts: vec!["  ".into()],
            ..ShieldOptions::default()
        })
    );
    assert!(e.contains("empty"), "{e}");
    let e = format!(
        "{:#}",
        err(ShieldOptions {
            ctx_size: 32,
            ..ShieldOptions::default()
        })
    );
    assert!(e.contains("more than the context"), "{e}");
    let ok = ShieldFilter::new(vec![load_shield()], &ShieldOptions::default()).unwrap();
    assert!(ok.warnings.iter().any(|w| w.contains("images")), "{ok:?}");
}

#[test]
fn a_flagged_image_is_blocked() {
    let _serial = serial();
    // ShieldGemma 2 (tiny) beside the text classifier: img_a scores 0.729 on `violence`
    // (reference.json); `violence` is an image policy only, so text goes unchecked.
    let image_shield =
        gemma_engine::load(Some(&shield_dir().join("../image")), &Default::default())
            .expect("the image shield loads");
    let filter = ShieldFilter::new(
        vec![load_shield(), image_shield],
        &options(&["violence"], 0.6, 8),
    )
    .unwrap();
    assert!(filter.checks_images());
    assert!(
        filter.warnings.iter().any(|w| w.contains("text")),
        "{filter:?}"
    );
    let s = server(Some(Arc::new(filter)));
    let png = std::fs::read(shield_dir().join("../img_a_97x73.png")).unwrap();
    let body = parts_body(
        vec![
            image_part(&data_url("image/png", &png)),
            text_part("What is this?"),
        ],
        8,
    );
    let v = chat(s.addr, &body);
    assert_eq!(v["choices"][0]["finish_reason"], "content_filter", "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "This request was blocked by the safety filter (policy: violence)."
    );
    // Text alone is not checked by an image policy.
    let v = chat(s.addr, &chat_body(PROMPT, 4));
    assert_ne!(v["choices"][0]["finish_reason"], "content_filter", "{v}");
    assert_eq!(
        metric(s.addr, "gemma_shield_hits_total{policy=\"violence\"}"),
        1.0
    );
}
