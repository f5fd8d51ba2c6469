//! Building the tokenizer from `tokenizer.ggml.*` metadata of small GGUF images written with
//! our own GGUF writer.

use std::sync::Arc;

use gemma_formats::{GgufFile, GgufWriter, MetaValue};
use gemma_tokenizer::{Tokenizer, TokenizerError};

fn strings(items: &[&str]) -> MetaValue {
    MetaValue::Array(
        items
            .iter()
            .map(|s| MetaValue::String((*s).to_owned()))
            .collect(),
    )
}

fn gguf(entries: Vec<(&str, MetaValue)>) -> GgufFile {
    let mut writer = GgufWriter::new();
    for (key, value) in entries {
        writer.add_metadata(key, value).unwrap();
    }
    let mut bytes = Vec::new();
    writer.write_to(&mut bytes).unwrap();
    GgufFile::from_bytes(Arc::new(bytes)).unwrap()
}

const PIECES: &[&str] = &[
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<0x0A>",
    "\u{2581}",
    "a",
    "b",
    "ab",
    "\u{2581}ab",
];

fn gemma_like_entries() -> Vec<(&'static str, MetaValue)> {
    let types = [3, 3, 3, 2, 6, 1, 1, 1, 1, 1];
    let scores = [
        -1000.0, -1000.0, -1000.0, -1000.0, 0.0, -5.0, -3.0, -3.0, -2.0, -1.0,
    ];
    vec![
        ("tokenizer.ggml.model", MetaValue::String("llama".into())),
        ("tokenizer.ggml.tokens", strings(PIECES)),
        (
            "tokenizer.ggml.scores",
            MetaValue::Array(scores.iter().map(|&s| MetaValue::F32(s)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            MetaValue::Array(types.iter().map(|&t| MetaValue::I32(t)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", MetaValue::U32(2)),
        ("tokenizer.ggml.eos_token_id", MetaValue::U32(1)),
        ("tokenizer.ggml.unknown_token_id", MetaValue::U32(3)),
        ("tokenizer.ggml.padding_token_id", MetaValue::U32(0)),
        ("tokenizer.ggml.add_bos_token", MetaValue::Bool(true)),
        ("tokenizer.ggml.add_space_prefix", MetaValue::Bool(false)),
    ]
}

#[test]
fn reads_a_gemma_style_vocabulary() {
    let t = Tokenizer::from_gguf(&gguf(gemma_like_entries())).unwrap();
    assert_eq!(t.vocab_size(), PIECES.len());
    assert_eq!((t.bos_id(), t.eos_id()), (Some(2), Some(1)));
    assert!(t.add_bos_default());
    assert!(t.is_control(1));
    assert_eq!(t.encode("ab ab\n", true, true).unwrap(), vec![2, 8, 9, 4]);
    assert_eq!(t.decode(&[2, 8, 9, 4], true).unwrap(), "ab ab\n");
}

#[test]
fn llama_defaults_apply_to_missing_keys() {
    // Without add_space_prefix SentencePiece vocabularies prefix a space (llama.cpp default);
    // without token types every token is normal; without ids BOS is 1 and EOS 2.
    let entries = gemma_like_entries()
        .into_iter()
        .filter(|(key, _)| {
            !matches!(
                *key,
                "tokenizer.ggml.add_space_prefix"
                    | "tokenizer.ggml.token_type"
                    | "tokenizer.ggml.bos_token_id"
                    | "tokenizer.ggml.eos_token_id"
            )
        })
        .collect();
    let t = Tokenizer::from_gguf(&gguf(entries)).unwrap();
    assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(2)));
    assert_eq!(t.encode("ab", false, false).unwrap(), vec![9]); // "▁ab"
    assert!(!t.is_control(2));
    // ... except that llama.cpp still treats "<eos>" as an end-of-generation control token.
    assert!(t.is_control(1));
}

#[test]
fn unsupported_or_broken_metadata_is_a_typed_error() {
    let mut bpe = gemma_like_entries();
    bpe[0].1 = MetaValue::String("gpt2".into());
    match Tokenizer::from_gguf(&gguf(bpe)) {
        Err(e @ TokenizerError::UnsupportedModel(_)) => {
            assert!(e.to_string().contains("\"gpt2\""), "{e}")
        }
        other => panic!("expected UnsupportedModel, got {other:?}"),
    }

    let no_model = gemma_like_entries().into_iter().skip(1).collect();
    assert!(matches!(
        Tokenizer::from_gguf(&gguf(no_model)),
        Err(TokenizerError::MissingKey {
            key: "tokenizer.ggml.model"
        })
    ));

    let mut bos_out_of_range = gemma_like_entries();
    bos_out_of_range[4].1 = MetaValue::U32(999);
    assert!(matches!(
        Tokenizer::from_gguf(&gguf(bos_out_of_range)),
        Err(TokenizerError::SpecialIdOutOfRange { id: 999, .. })
    ));

    let mut short_scores = gemma_like_entries();
    short_scores[2].1 = MetaValue::Array(vec![MetaValue::F32(0.0)]);
    assert!(matches!(
        Tokenizer::from_gguf(&gguf(short_scores)),
        Err(TokenizerError::LengthMismatch {
            field: "scores",
            ..
        })
    ));

    let mut wrong_type = gemma_like_entries();
    wrong_type[1].1 = MetaValue::U32(7);
    assert!(matches!(
        Tokenizer::from_gguf(&gguf(wrong_type)),
        Err(TokenizerError::Gguf(_))
    ));
}
