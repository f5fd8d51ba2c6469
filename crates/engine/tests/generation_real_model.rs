//! Sessions, chat and perplexity on the real default model (fetched on first use).

use std::sync::OnceLock;

use gemma_engine::gemma_models::Logits;
use gemma_engine::{
    ensure_default_model, load, Chat, GenerationStats, LoadOptions, LoadedModel, SamplingParams,
    Session, StopReason,
};

fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = ensure_default_model().expect("the default model is available");
        load(Some(&path), &LoadOptions::default()).expect("the default model loads")
    })
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ..SamplingParams::greedy()
    }
}

fn generate_text(
    session: &mut Session<'_>,
    ids: &[u32],
    params: &SamplingParams,
) -> (String, GenerationStats) {
    let mut text = String::new();
    let stats = session
        .generate(ids, params, &mut |t| {
            text.push_str(t);
            true
        })
        .unwrap();
    (text, stats)
}

#[test]
fn first_greedy_token_is_the_argmax_of_the_logits() {
    let m = model();
    let ids = m.encode_prompt("The capital of France is").unwrap();
    let mut cache = m.model.new_cache(64).unwrap();
    let logits = m
        .model
        .forward(&ids, &mut cache, Logits::Last)
        .unwrap()
        .to_vec();
    let argmax = (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)))
        .unwrap() as u32;

    let mut session = Session::new(m, 64).unwrap();
    let (_, stats) = generate_text(&mut session, &ids, &greedy(3));
    assert_eq!(stats.tokens[0], argmax);
    assert_eq!(stats.prompt_tokens, ids.len());
    assert_eq!(stats.generated_tokens, 3);
    assert_eq!(stats.stop_reason, StopReason::MaxTokens);
}

#[test]
fn streamed_text_is_the_decoded_tokens() {
    let m = model();
    let ids = m.encode_prompt("Once upon a time").unwrap();
    let mut session = Session::new(m, 128).unwrap();
    let (text, stats) = generate_text(&mut session, &ids, &greedy(10));
    let decoded = m
        .tokenizer
        .as_ref()
        .unwrap()
        .decode(&stats.tokens, true)
        .unwrap();
    assert_eq!(text, decoded);
    assert!(!text.is_empty());
}

#[test]
fn seeded_sampling_is_reproducible() {
    let m = model();
    let ids = m.encode_prompt("My favourite animal is").unwrap();
    let params = SamplingParams {
        seed: Some(99),
        max_tokens: 8,
        ..SamplingParams::default()
    };
    let run = || {
        let mut session = Session::new(m, 128).unwrap();
        generate_text(&mut session, &ids, &params).1.tokens
    };
    assert_eq!(run(), run());
}

#[test]
fn prompt_over_the_context_is_an_error_unless_truncated() {
    let m = model();
    let ids = m.encode_prompt(&"word ".repeat(40)).unwrap();
    assert!(ids.len() > 16);
    let mut session = Session::new(m, 16).unwrap();
    let err = session
        .generate(&ids, &greedy(4), &mut |_| true)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err.split(" (").next().unwrap(),
        format!("prompt has {} tokens but the context size is 16", ids.len())
    );

    let params = SamplingParams {
        truncate: true,
        ..greedy(4)
    };
    let mut session = Session::new(m, 16).unwrap();
    let stats = session.generate(&ids, &params, &mut |_| true).unwrap();
    assert_eq!(stats.generated_tokens, 4);
    assert_eq!(session.history()[0], 2, "BOS is kept when truncating");
    assert!(session.history().len() <= 16);
}

#[test]
fn generation_stops_when_the_context_is_full() {
    let m = model();
    let ids = m.encode_prompt("Count: 1, 2, 3,").unwrap();
    let ctx = ids.len() + 3;
    let mut session = Session::new(m, ctx).unwrap();
    let (_, stats) = generate_text(&mut session, &ids, &greedy(100));
    assert_eq!(stats.stop_reason, StopReason::ContextFull);
    assert_eq!(stats.generated_tokens, 4, "3 fed + 1 sampled but never fed");
}

#[test]
fn callback_can_cancel() {
    let m = model();
    let ids = m.encode_prompt("Tell me a long story.").unwrap();
    let mut session = Session::new(m, 128).unwrap();
    let mut pieces = 0;
    let stats = session
        .generate(&ids, &greedy(50), &mut |_| {
            pieces += 1;
            pieces < 2
        })
        .unwrap();
    assert_eq!(stats.stop_reason, StopReason::Cancelled);
    assert_eq!(pieces, 2);
}

#[test]
fn chat_feeds_only_the_new_turn() {
    let m = model();
    let mut chat = Chat::new(m, 512, None).unwrap();
    let params = greedy(40);
    let first = chat.send("Say hello.", &params, &mut |_| true).unwrap();
    let after_first = chat.session().history().len();
    let second = chat
        .send("Now say goodbye.", &params, &mut |_| true)
        .unwrap();
    assert!(!first.answer.is_empty() && !second.answer.is_empty());
    // Incremental: the second prompt is the pending stop token plus the new turn, far fewer
    // tokens than the whole conversation.
    assert!(
        second.stats.prompt_tokens < after_first / 2,
        "second turn fed {} tokens, the conversation had {after_first}",
        second.stats.prompt_tokens
    );
    // The cache then holds exactly the rendered conversation so far.
    let rendered = m.render_chat(None, &chat.messages()[..3]).unwrap();
    let fed = &chat.session().history()[..after_first + second.stats.prompt_tokens];
    let fed_text = m.tokenizer.as_ref().unwrap().decode(fed, false).unwrap();
    assert_eq!(fed_text, rendered);
}

#[test]
fn perplexity_runs_on_real_text() {
    let m = model();
    let text = "The sun rises in the east and sets in the west. ".repeat(10);
    let mut chunks_seen = 0;
    let r = gemma_engine::perplexity(m, &text, 32, &mut |_, _, _| chunks_seen += 1).unwrap();
    assert_eq!(chunks_seen, r.chunks);
    assert_eq!(r.scored_tokens, r.chunks * (32 - 16 - 1));
    assert!(r.ppl.is_finite() && (1.0..50.0).contains(&r.ppl), "{r:?}");
}
