//! Grammar-constrained sampling with llguidance: our tokenizer as a `toktrie::TokenizerEnv`,
//! JSON schemas compiled into per-step token masks.

use std::sync::Arc;

use anyhow::{anyhow, Result};
use gemma_engine::gemma_tokenizer::Tokenizer;
use gemma_engine::LoadedModel;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

/// The tokenizer seen by llguidance: every token's bytes (control tokens behind the 0xFF
/// marker so that text can never produce them) and our encoder.
struct GemmaTokEnv {
    trie: TokTrie,
    loaded: Arc<LoadedModel>,
}

impl GemmaTokEnv {
    fn tokenizer(&self) -> &Tokenizer {
        self.loaded
            .tokenizer
            .as_ref()
            .expect("checked when the compiler was built")
    }
}

impl TokenizerEnv for GemmaTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let text = String::from_utf8_lossy(s);
        self.tokenizer()
            .encode(&text, false, false)
            .unwrap_or_default()
    }
}

/// Builds matchers for JSON schemas; one per server (building the trie takes a moment).
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl GrammarCompiler {
    /// `end_token` is the token the model ends its answer with (`<end_of_turn>` for chat):
    /// the grammar allows it once the document is complete.
    pub fn new(loaded: Arc<LoadedModel>, end_token: u32) -> Result<GrammarCompiler> {
        let tokenizer = loaded
            .tokenizer
            .as_ref()
            .ok_or_else(|| anyhow!("constrained output needs a tokenizer"))?;
        let vocab = tokenizer.vocab_size();
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id).unwrap_or_default();
                if tokenizer.is_control(id) {
                    let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    marked.extend_from_slice(&bytes);
                    marked
                } else {
                    bytes
                }
            })
            .collect();
        let info = TokRxInfo::new(vocab as u32, end_token);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(GemmaTokEnv { trie, loaded });
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        Ok(GrammarCompiler { factory })
    }

    /// A matcher for documents valid under `schema`. Errors name what llguidance rejected.
    pub fn json_schema(&self, schema: &Value) -> Result<Matcher> {
        let mut schema = schema.clone();
        if let Some(object) = schema.as_object_mut() {
            // Compact separators and no free whitespace: a small model cannot wander off
            // into endless blank lines, and the output stays short.
            object.entry("x-guidance").or_insert_with(|| {
                json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
            });
        } else if !schema.is_boolean() {
            return Err(anyhow!("a JSON schema must be an object or a boolean"));
        }
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(anyhow!(error));
        }
        Ok(matcher)
    }

    /// Any JSON object (`response_format: json_object`).
    pub fn json_object(&self) -> Result<Matcher> {
        self.json_schema(&json!({"type": "object"}))
    }
}

/// Sets the logits of tokens the grammar forbids to minus infinity. Returns `false` when the
/// matcher is in an error state (generation should end).
pub fn apply_mask(matcher: &mut Matcher, logits: &mut [f32]) -> bool {
    let Ok(mask) = matcher.compute_mask_or_eos() else {
        return false;
    };
    let allowed_len = mask.len();
    for (id, logit) in logits.iter_mut().enumerate() {
        if id >= allowed_len || !mask.is_allowed(id as TokenId) {
            *logit = f32::NEG_INFINITY;
        }
    }
    true
}

/// One constrained generation without the server (`gemma run --json-schema`): the output is
/// a document valid under `schema` unless `params.max_tokens` cuts it short. `on_text`
/// receives the text piece by piece; the whole text is returned.
pub fn generate_json(
    loaded: Arc<LoadedModel>,
    prompt: &[u32],
    params: &gemma_engine::SamplingParams,
    ctx_size: usize,
    schema: &Value,
    on_text: &mut dyn FnMut(&str),
) -> Result<String> {
    let tokenizer_end = loaded
        .tokenizer
        .as_ref()
        .and_then(|t| t.token_id("<end_of_turn>").or(t.eos_id()))
        .ok_or_else(|| anyhow!("constrained output needs a tokenizer"))?;
    let compiler = GrammarCompiler::new(loaded.clone(), tokenizer_end)?;
    let mut matcher = compiler
        .json_schema(schema)
        .map_err(|e| anyhow!("unsupported JSON schema: {e:#}"))?;
    let stop_ids = loaded.stop_token_ids();
    let tokenizer = loaded.tokenizer.as_ref().expect("checked above");
    let mut cache = loaded.model.new_cache(ctx_size)?;
    if prompt.is_empty() || prompt.len() >= ctx_size {
        return Err(anyhow!(
            "the prompt has {} tokens; it must be between 1 and the context size {ctx_size} - 1",
            prompt.len()
        ));
    }
    let mut sampler = gemma_engine::Sampler::new(params);
    let mut decoder = gemma_engine::gemma_tokenizer::StreamDecoder::new();
    let mut history = prompt.to_vec();
    let mut text = String::new();
    let mut logits = loaded
        .model
        .forward(prompt, &mut cache, gemma_engine::gemma_models::Logits::Last)?
        .to_vec();
    for _ in 0..params.max_tokens {
        if !apply_mask(&mut matcher, &mut logits) {
            break;
        }
        let id = sampler.sample(&logits, &history);
        if stop_ids.contains(&id) {
            break;
        }
        matcher
            .consume_token(id)
            .map_err(|e| anyhow!("the grammar rejected a sampled token: {e}"))?;
        history.push(id);
        let piece = decoder.push(tokenizer, id);
        on_text(&piece);
        text.push_str(&piece);
        if matcher.is_stopped() || cache.len() + 1 >= ctx_size {
            break;
        }
        logits.clear();
        logits.extend_from_slice(loaded.model.forward(
            &[id],
            &mut cache,
            gemma_engine::gemma_models::Logits::Last,
        )?);
    }
    let tail = decoder.finish();
    on_text(&tail);
    text.push_str(&tail);
    Ok(text)
}
