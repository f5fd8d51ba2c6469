//! Our SentencePiece tokenizer on the real default model against llama.cpp:
//! fixtures/tokenizer/llama_cpp_ids.json holds llama.cpp's ids and detokenizations for varied
//! strings (scripts/make_tokenizer_fixtures.py, part `llama`).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use gemma_engine::ensure_default_model;
use gemma_engine::gemma_formats::GgufFile;
use gemma_engine::gemma_tokenizer::{StreamDecoder, Tokenizer};
use serde_json::Value;

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = ensure_default_model().expect("the default model is available");
        let file = GgufFile::open(&path).expect("the default model opens");
        let start = Instant::now();
        let tokenizer =
            Tokenizer::from_gguf(&file).expect("the default model's vocabulary is valid");
        eprintln!("tokenizer built in {:?}", start.elapsed());
        tokenizer
    })
}

struct Case {
    text: String,
    add_bos: bool,
    parse_special: bool,
    ids: Vec<u32>,
    detok_special: Vec<u8>,
    detok_plain: Vec<u8>,
}

fn cases() -> Vec<Case> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/tokenizer/llama_cpp_ids.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases: Vec<Case> = fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().to_owned(),
            add_bos: c["add_bos"].as_bool().unwrap(),
            parse_special: c["parse_special"].as_bool().unwrap(),
            ids: c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect(),
            detok_special: hex(c["detok_special_hex"].as_str().unwrap()),
            detok_plain: hex(c["detok_plain_hex"].as_str().unwrap()),
        })
        .collect();
    assert!(cases.len() >= 75, "fixture too small: {}", cases.len());
    cases
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn vocabulary_metadata_is_gemma3() {
    let t = tokenizer();
    assert_eq!(t.vocab_size(), 262_144);
    assert_eq!((t.bos_id(), t.eos_id()), (Some(2), Some(1)));
    assert!(t.add_bos_default());
    assert_eq!(t.token_id("<start_of_turn>"), Some(105));
    assert_eq!(t.token_id("<end_of_turn>"), Some(106));
    assert!(t.is_control(106) && t.is_control(1) && !t.is_control(108));
    assert_eq!(t.token_to_piece(108), Some("\n\n"));
}

#[test]
fn ids_match_llama_cpp() {
    let t = tokenizer();
    let mut mismatches = Vec::new();
    for case in cases() {
        let ours = t
            .encode(
                &case.text,
                case.add_bos && t.add_bos_default(),
                case.parse_special,
            )
            .unwrap();
        if ours != case.ids {
            mismatches.push(format!(
                "{:?} (add_bos={}, parse_special={}):\n  llama.cpp {:?}\n  ours      {:?}",
                case.text, case.add_bos, case.parse_special, case.ids, ours
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[test]
fn detokenization_matches_llama_cpp() {
    let t = tokenizer();
    for case in cases() {
        assert_eq!(
            t.decode_bytes(&case.ids, false).unwrap(),
            case.detok_special,
            "{:?} with specials",
            case.text
        );
        assert_eq!(
            t.decode_bytes(&case.ids, true).unwrap(),
            case.detok_plain,
            "{:?} without specials",
            case.text
        );
    }
}

#[test]
fn decode_of_encode_round_trips() {
    let t = tokenizer();
    // A literal "▁" in the text decodes as a space, as in SentencePiece and llama.cpp.
    let texts = cases()
        .into_iter()
        .filter(|c| c.add_bos && !c.parse_special && !c.text.contains('\u{2581}'));
    for case in texts {
        let text = &case.text;
        // Special-looking text stays text without special parsing; BOS is hidden.
        let ids = t.encode(text, true, false).unwrap();
        assert_eq!(&t.decode(&ids, true).unwrap(), text);
        // With special parsing, markers become control tokens and come back when shown.
        let ids = t.encode(text, false, true).unwrap();
        assert_eq!(&t.decode(&ids, false).unwrap(), text);

        let mut stream = StreamDecoder::keeping_special();
        let streamed: String =
            ids.iter().map(|&id| stream.push(t, id)).collect::<String>() + &stream.finish();
        assert_eq!(&streamed, text);
    }
}
