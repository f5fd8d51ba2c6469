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
        GrammarCompiler::from_env(&env)
    }

    /// A compiler over any tokenizer (the tests use llguidance's one-byte tokens).
    pub fn from_env(env: &TokEnv) -> Result<GrammarCompiler> {
        let mut factory = ParserFactory::new_simple(env)?;
        factory.quiet();
        Ok(GrammarCompiler { factory })
    }

    /// A matcher for documents valid under `schema`, after [`crate::schema::normalize`]
    /// (no invented keys, bounded numbers, bounded recursion). Errors are one line naming
    /// the problem.
    pub fn json_schema(&self, schema: &Value) -> Result<Matcher> {
        let normalized = crate::schema::normalize(schema, "gemma_").map_err(|e| anyhow!(e))?;
        self.compile(normalized.into_document())
    }

    /// A matcher for a schema already normalized (its `$ref`s resolved and bounded).
    pub fn compile(&self, mut schema: Value) -> Result<Matcher> {
        if let Some(object) = schema.as_object_mut() {
            // Compact separators and no free whitespace: a small model cannot wander off
            // into endless blank lines, and the output stays short.
            object.entry("x-guidance").or_insert_with(|| {
                json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
            });
        } else if !schema.is_boolean() {
            return Err(anyhow!("a JSON schema must be an object or a boolean"));
        }
        let one_line = |e: String| anyhow!(e.split_whitespace().collect::<Vec<_>>().join(" "));
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| one_line(format!("{e:#}")))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(one_line(error));
        }
        // A grammar that allows no first token can only end in an empty answer.
        let opens = matcher
            .compute_mask()
            .map_err(|e| one_line(format!("{e:#}")))?;
        if opens.is_zero() {
            return Err(anyhow!("no JSON document satisfies the schema"));
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
/// a document valid under `schema`. `on_text` receives the text piece by piece; the whole
/// text is returned, or an error when `params.max_tokens` or the context cut the document
/// short (the pieces sent so far are that incomplete document).
pub fn generate_json(
    loaded: Arc<LoadedModel>,
    prompt: &[u32],
    params: &gemma_engine::SamplingParams,
    ctx_size: usize,
    schema: &Value,
    on_text: &mut dyn FnMut(&str),
) -> Result<String> {
    let compiler = GrammarCompiler::new(loaded.clone(), json_end_token(&loaded)?)?;
    generate_json_with(
        &compiler,
        &loaded,
        prompt,
        params,
        ctx_size,
        schema,
        &mut |piece| {
            on_text(piece);
            true
        },
    )
}

/// The token a constrained answer ends with: `<end_of_turn>`, else EOS.
pub fn json_end_token(loaded: &LoadedModel) -> Result<u32> {
    loaded
        .tokenizer
        .as_ref()
        .and_then(|t| t.token_id("<end_of_turn>").or(t.eos_id()))
        .ok_or_else(|| anyhow!("constrained output needs a tokenizer"))
}

/// [`generate_json`] with a compiler kept by the caller (building one takes a moment) for
/// `loaded` and [`json_end_token`]. `on_text` returns `false` to stop early: the text so far
/// is returned then, incomplete.
pub fn generate_json_with(
    compiler: &GrammarCompiler,
    loaded: &LoadedModel,
    prompt: &[u32],
    params: &gemma_engine::SamplingParams,
    ctx_size: usize,
    schema: &Value,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<String> {
    let mut matcher = compiler
        .json_schema(schema)
        .map_err(|e| anyhow!("unsupported JSON schema: {e:#}"))?;
    let stop_ids = loaded.stop_token_ids();
    let tokenizer = loaded
        .tokenizer
        .as_ref()
        .ok_or_else(|| anyhow!("constrained output needs a tokenizer"))?;
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
    let mut complete = false;
    for _ in 0..params.max_tokens {
        if !apply_mask(&mut matcher, &mut logits) {
            let error = matcher.get_error().unwrap_or_default();
            return Err(anyhow!("the grammar failed: {error}"));
        }
        let id = sampler.sample(&logits[..loaded.model.sampleable_vocab()], &history);
        if stop_ids.contains(&id) {
            // The grammar allows the end only once the document is complete.
            complete = true;
            break;
        }
        matcher
            .consume_token(id)
            .map_err(|e| anyhow!("the grammar rejected a sampled token: {e}"))?;
        history.push(id);
        let piece = decoder.push(tokenizer, id);
        text.push_str(&piece);
        if !on_text(&piece) {
            return Ok(text);
        }
        if matcher.is_stopped() {
            complete = !matcher.is_error();
            break;
        }
        if cache.len() + 1 >= ctx_size {
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
    if !complete {
        return Err(anyhow!(
            "the JSON document was cut short after {} tokens (the token limit or the context \
             size ended it); raise -n",
            history.len() - prompt.len()
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use toktrie::ApproximateTokEnv;

    fn compiler() -> (GrammarCompiler, TokEnv) {
        let env = ApproximateTokEnv::single_byte_env();
        (GrammarCompiler::from_env(&env).unwrap(), env)
    }

    /// Whether the grammar of `schema` accepts exactly `text` (as a whole document).
    fn accepts(schema: &Value, text: &str) -> bool {
        let (compiler, env) = compiler();
        let mut matcher = compiler.json_schema(schema).unwrap();
        let tokens = env.tokenize_bytes(text.as_bytes());
        let valid = matcher.validate_tokens(&tokens).unwrap();
        valid == tokens.len()
            && matcher.consume_tokens(&tokens).is_ok()
            && matcher.is_accepting().unwrap()
    }

    fn error(schema: &Value) -> String {
        let (compiler, _) = compiler();
        match compiler.json_schema(schema) {
            Ok(_) => panic!("{schema} compiled"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn unspecified_additional_properties_is_false() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert!(accepts(&schema, r#"{"a": 1}"#));
        assert!(accepts(&schema, "{}"));
        assert!(!accepts(&schema, r#"{"a": 1, "b": 2}"#));
        let open = json!({"type": "object", "properties": {"a": {"type": "integer"}},
                          "additionalProperties": true});
        assert!(accepts(&open, r#"{"a": 1, "b": 2}"#));
        // A bare object schema stays any object.
        assert!(accepts(&json!({"type": "object"}), r#"{"b": [true]}"#));
    }

    #[test]
    fn intersections_are_closed_over_all_their_keys() {
        let schema = json!({
            "$defs": {"base": {"type": "object", "properties": {"id": {"type": "integer"}},
                               "required": ["id"]}},
            "allOf": [{"$ref": "#/$defs/base"},
                      {"properties": {"name": {"type": "string"}}, "required": ["name"]}],
        });
        assert!(accepts(&schema, r#"{"id": 1, "name": "x"}"#));
        assert!(!accepts(&schema, r#"{"id": 1, "name": "x", "other": 0}"#));
        // The definition used alone is closed too.
        let alone = json!({"$defs": schema["$defs"], "$ref": "#/$defs/base"});
        assert!(accepts(&alone, r#"{"id": 1}"#));
        assert!(!accepts(&alone, r#"{"id": 1, "name": "x"}"#));
    }

    #[test]
    fn integers_have_at_most_fifteen_digits() {
        let schema = json!({"type": "integer"});
        assert!(accepts(&schema, "999999999999999"));
        assert!(accepts(&schema, "-999999999999999"));
        assert!(!accepts(&schema, "1000000000000000"));
        // A schema that needs more keeps its bounds.
        let wide = json!({"type": "integer", "minimum": 0, "maximum": 100000000000000000i64});
        assert!(accepts(&wide, "100000000000000000"));
        let above = json!({"type": "integer", "minimum": 10000000000000000i64});
        assert!(accepts(&above, "10000000000000001"));
    }

    #[test]
    fn numbers_have_bounded_digits_and_no_exponent() {
        let schema = json!({"type": "number"});
        for ok in [
            "0",
            "-3.25",
            "999999999999998.999999",
            "-999999999999999",
            "0.000001",
            "12.500000",
        ] {
            assert!(accepts(&schema, ok), "{ok}");
        }
        for bad in ["1e5", "1000000000000000", "0.0000001", "1.1234567"] {
            assert!(!accepts(&schema, bad), "{bad}");
        }
        let coarse = json!({"type": "number", "multipleOf": 0.5, "minimum": 0, "maximum": 10});
        assert!(accepts(&coarse, "2.5"));
        assert!(!accepts(&coarse, "2.25"));
        let optional = json!({"anyOf": [{"type": "number"}, {"type": "null"}]});
        assert!(accepts(&optional, "null") && accepts(&optional, "1.5"));
        assert!(!accepts(&optional, "1.1234567"));
    }

    #[test]
    fn strings_and_arrays_have_default_limits() {
        let text = json!({"type": "string"});
        assert!(accepts(&text, &format!("\"{}\"", "a".repeat(256))));
        assert!(!accepts(&text, &format!("\"{}\"", "a".repeat(257))));
        let list = json!({"type": "array", "items": {"type": "integer"}});
        let items = |n: usize| format!("[{}]", vec!["1"; n].join(", "));
        assert!(accepts(&list, &items(32)) && !accepts(&list, &items(33)));
        // Formats and patterns keep working under the length limit.
        assert!(accepts(
            &json!({"type": "string", "format": "date"}),
            "\"2024-01-31\""
        ));
        assert!(accepts(
            &json!({"type": "string", "format": "email"}),
            "\"a@b.org\""
        ));
        assert!(accepts(
            &json!({"type": "string", "pattern": "^[a-z]+$"}),
            "\"abc\""
        ));
    }

    #[test]
    fn recursion_is_bounded() {
        let tree = json!({"type": "object",
                          "properties": {"name": {"type": "string"},
                                         "children": {"type": "array", "items": {"$ref": "#"}}},
                          "required": ["name", "children"]});
        assert!(accepts(
            &tree,
            r#"{"name": "a", "children": [{"name": "b", "children": []}]}"#
        ));
        let mut deep = String::from(r#"{"name": "x", "children": []}"#);
        for _ in 0..crate::schema::MAX_RECURSION {
            deep = format!(r#"{{"name": "x", "children": [{deep}]}}"#);
        }
        assert!(accepts(&tree, &deep));
        let too_deep = format!(r#"{{"name": "x", "children": [{deep}]}}"#);
        assert!(!accepts(&tree, &too_deep));
        let list = json!({"$defs": {"node": {"type": "object",
                          "properties": {"v": {"type": "integer"}, "next": {"$ref": "#/$defs/node"}},
                          "required": ["v"]}},
                          "$ref": "#/$defs/node"});
        assert!(accepts(&list, r#"{"v": 1, "next": {"v": 2}}"#));
    }

    #[test]
    fn schemas_without_a_finite_document_are_refused() {
        for schema in [
            json!({"$ref": "#"}),
            json!({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                   "$ref": "#/$defs/a"}),
            json!({"type": "object", "properties": {"next": {"$ref": "#"}}, "required": ["next"]}),
        ] {
            let e = error(&schema);
            assert!(
                e.contains("recursive") && e.contains("levels"),
                "{schema}: {e}"
            );
        }
    }

    #[test]
    fn bad_references_and_keywords_are_named() {
        let e = error(&json!({"properties": {"a": {"$ref": "#/$defs/missing"}}}));
        assert!(
            e.contains("#/$defs/missing") && e.contains("points nowhere"),
            "{e}"
        );
        let e = error(&json!({"$ref": "https://example.com/s.json"}));
        assert!(e.contains("outside the schema"), "{e}");
        let e = error(&json!({"type": "object", "not": {"type": "string"}}));
        assert!(e.contains("not"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = error(&json!([1, 2]));
        assert!(e.contains("object or a boolean"), "{e}");
    }
}
