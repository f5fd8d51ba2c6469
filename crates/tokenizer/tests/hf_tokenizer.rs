//! `tokenizer.json` support against fixtures/tokenizer/tiny_tokenizer*.json: a small
//! SentencePiece-style BPE trained, and its encodings produced, by the Python `tokenizers`
//! package (scripts/make_tokenizer_fixtures.py, part `hf`).

use std::path::PathBuf;

use gemma_tokenizer::{StreamDecoder, Tokenizer, TokenizerError};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Expected {
    bos_id: u32,
    eos_id: u32,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    parse_special: bool,
    ids_with_bos: Vec<u32>,
    ids: Vec<u32>,
    decoded_skip_special: String,
    decoded_with_special: String,
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/tokenizer")
        .join(name)
}

fn expected() -> Expected {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny_tokenizer_ids.json")).unwrap())
        .unwrap()
}

#[test]
fn ids_match_python_tokenizers() {
    let expected = expected();
    let tokenizer = Tokenizer::from_hf_file(&fixture("tiny_tokenizer.json"), None).unwrap();
    assert_eq!(tokenizer.bos_id(), Some(expected.bos_id));
    assert_eq!(tokenizer.eos_id(), Some(expected.eos_id));
    assert!(tokenizer.add_bos_default(), "the post-processor adds <bos>");
    assert!(expected.cases.len() >= 10);
    let mut special_parsing_differs = false;
    for case in &expected.cases {
        let with_bos = tokenizer
            .encode(&case.text, true, case.parse_special)
            .unwrap();
        assert_eq!(
            with_bos, case.ids_with_bos,
            "{:?} parse_special={}",
            case.text, case.parse_special
        );
        let plain = tokenizer
            .encode(&case.text, false, case.parse_special)
            .unwrap();
        assert_eq!(
            plain, case.ids,
            "{:?} parse_special={}",
            case.text, case.parse_special
        );
        assert_eq!(
            tokenizer.decode(&with_bos, true).unwrap(),
            case.decoded_skip_special
        );
        assert_eq!(
            tokenizer.decode(&with_bos, false).unwrap(),
            case.decoded_with_special
        );
        special_parsing_differs |=
            !case.parse_special && case.text.contains("<start_of_turn>") && plain.len() > 8;
    }
    assert!(
        special_parsing_differs,
        "fixture must show literal special-token text"
    );
}

#[test]
fn raw_bytes_and_streaming_follow_byte_fallback() {
    let tokenizer = Tokenizer::from_hf_file(&fixture("tiny_tokenizer.json"), None).unwrap();
    let text = "hello 😀 world";
    let ids = tokenizer.encode(text, true, true).unwrap();
    assert_eq!(tokenizer.decode_bytes(&ids, true).unwrap(), text.as_bytes());
    let mut stream = StreamDecoder::new();
    let mut out = String::new();
    for &id in &ids {
        let piece = stream.push(&tokenizer, id);
        assert!(!piece.contains('\u{FFFD}'));
        out.push_str(&piece);
    }
    out.push_str(&stream.finish());
    assert_eq!(out, text);

    let bos = tokenizer.bos_id().unwrap();
    assert!(tokenizer.is_control(bos));
    assert_eq!(tokenizer.token_to_piece(bos), Some("<bos>"));
    assert_eq!(
        tokenizer
            .token_id("<end_of_turn>")
            .and_then(|id| tokenizer.token_bytes(id)),
        Some(b"<end_of_turn>".to_vec())
    );
    assert_eq!(
        tokenizer
            .token_id("<0xF0>")
            .and_then(|id| tokenizer.token_bytes(id)),
        Some(vec![0xF0])
    );
    assert!(matches!(
        tokenizer.decode(&[1_000_000], false),
        Err(TokenizerError::UnknownTokenId { .. })
    ));
}

#[test]
fn tokenizer_config_overrides_special_tokens() {
    let config = json!({
        "bos_token": {"content": "<start_of_turn>"},
        "eos_token": "<end_of_turn>",
        "add_bos_token": false,
    });
    let tokenizer =
        Tokenizer::from_hf_file(&fixture("tiny_tokenizer.json"), Some(&config)).unwrap();
    assert_eq!(tokenizer.bos_id(), tokenizer.token_id("<start_of_turn>"));
    assert_eq!(tokenizer.eos_id(), tokenizer.token_id("<end_of_turn>"));
    assert!(!tokenizer.add_bos_default());

    let unknown = json!({"bos_token": "<nope>"});
    assert!(matches!(
        Tokenizer::from_hf_file(&fixture("tiny_tokenizer.json"), Some(&unknown)),
        Err(TokenizerError::Config(_))
    ));
}

#[test]
fn unreadable_files_are_typed_errors() {
    assert!(matches!(
        Tokenizer::from_hf_file(&fixture("does_not_exist.json"), None),
        Err(TokenizerError::Io { .. })
    ));
    let not_a_tokenizer =
        std::env::temp_dir().join(format!("gemma-tokenizer-test-{}.json", std::process::id()));
    std::fs::write(&not_a_tokenizer, "{\"model\": 42}").unwrap();
    let result = Tokenizer::from_hf_file(&not_a_tokenizer, None);
    std::fs::remove_file(&not_a_tokenizer).unwrap();
    assert!(matches!(result, Err(TokenizerError::HuggingFace(_))));
}
