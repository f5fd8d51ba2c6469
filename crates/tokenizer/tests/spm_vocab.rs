//! SentencePiece-BPE on small hand-made vocabularies: merge order by score, byte fallback,
//! special-token cutting, decoding, streaming and vocabulary validation.

use gemma_tokenizer::{token_type, SpmVocab, StreamDecoder, Tokenizer, TokenizerError};

const CONTROL: &[&str] = &["<pad>", "<eos>", "<bos>"];
const UNK: &str = "<unk>";
const TURN_START: &str = "<start_of_turn>";
const TURN_END: &str = "<end_of_turn>";

/// Control tokens, `<unk>`, user-defined newline runs and `</s>`, the 256 byte tokens, then
/// `normals` with their scores.
fn vocab(normals: &[(&str, f32)]) -> SpmVocab {
    let mut v = SpmVocab {
        bos_id: Some(2),
        eos_id: Some(1),
        unk_id: Some(3),
        pad_id: Some(0),
        add_bos: true,
        add_eos: false,
        add_space_prefix: false,
        ..SpmVocab::default()
    };
    let mut push = |piece: &str, score: f32, ty: i32| {
        v.tokens.push(piece.to_owned());
        v.scores.push(score);
        v.token_types.push(ty);
    };
    for piece in CONTROL {
        push(piece, -1000.0, token_type::CONTROL);
    }
    push(UNK, -1000.0, token_type::UNKNOWN);
    push(TURN_START, -1000.0, token_type::CONTROL);
    push(TURN_END, -1000.0, token_type::CONTROL);
    push("\n", -1000.0, token_type::USER_DEFINED);
    push("\n\n", -1000.0, token_type::USER_DEFINED);
    push("</s>", -1000.0, token_type::USER_DEFINED);
    for b in 0..=255u8 {
        push(&format!("<0x{b:02X}>"), 0.0, token_type::BYTE);
    }
    for &(piece, score) in normals {
        push(piece, score, token_type::NORMAL);
    }
    v
}

fn tokenizer(normals: &[(&str, f32)]) -> Tokenizer {
    Tokenizer::from_spm_vocab(vocab(normals)).expect("valid vocabulary")
}

fn id(t: &Tokenizer, piece: &str) -> u32 {
    t.token_id(piece)
        .unwrap_or_else(|| panic!("{piece:?} not in vocabulary"))
}

fn ids(t: &Tokenizer, pieces: &[&str]) -> Vec<u32> {
    pieces.iter().map(|p| id(t, p)).collect()
}

fn byte(t: &Tokenizer, b: u8) -> u32 {
    id(t, &format!("<0x{b:02X}>"))
}

#[test]
fn merges_the_best_scoring_pair_first() {
    let bc_wins = tokenizer(&[
        ("a", -10.0),
        ("b", -11.0),
        ("c", -12.0),
        ("ab", -5.0),
        ("bc", -1.0),
    ]);
    assert_eq!(
        bc_wins.encode("abc", false, false).unwrap(),
        ids(&bc_wins, &["a", "bc"])
    );

    let ab_wins = tokenizer(&[
        ("a", -10.0),
        ("b", -11.0),
        ("c", -12.0),
        ("ab", -1.0),
        ("bc", -5.0),
    ]);
    assert_eq!(
        ab_wins.encode("abc", false, false).unwrap(),
        ids(&ab_wins, &["ab", "c"])
    );

    // Equal scores: the leftmost pair merges first.
    let tie = tokenizer(&[
        ("a", -10.0),
        ("b", -11.0),
        ("c", -12.0),
        ("ab", -2.0),
        ("bc", -2.0),
    ]);
    assert_eq!(
        tie.encode("abc", false, false).unwrap(),
        ids(&tie, &["ab", "c"])
    );
}

#[test]
fn merging_continues_through_intermediate_pieces() {
    // "abcd": cd (-1) first, then ab (-2), then abcd (-3) from the two merged halves; the
    // b+cd candidate (-9) goes stale once b is taken.
    let t = tokenizer(&[
        ("a", -10.0),
        ("b", -10.0),
        ("c", -10.0),
        ("d", -10.0),
        ("cd", -1.0),
        ("ab", -2.0),
        ("abcd", -3.0),
        ("bcd", -9.0),
    ]);
    assert_eq!(t.encode("abcd", false, false).unwrap(), ids(&t, &["abcd"]));
    assert_eq!(
        t.encode("abcdab", false, false).unwrap(),
        ids(&t, &["abcd", "ab"])
    );
    // Without "ab" in reach the best chain is b + cd → bcd.
    assert_eq!(t.encode("bcd", false, false).unwrap(), ids(&t, &["bcd"]));
}

#[test]
fn spaces_become_the_escape_character() {
    let t = tokenizer(&[
        ("a", -1.0),
        ("b", -1.0),
        ("\u{2581}", -3.0),
        ("\u{2581}b", -2.0),
    ]);
    assert_eq!(
        t.encode("a b", false, false).unwrap(),
        ids(&t, &["a", "\u{2581}b"])
    );
    assert_eq!(
        t.encode("a  ", false, false).unwrap(),
        ids(&t, &["a", "\u{2581}", "\u{2581}"])
    );

    let mut with_prefix = vocab(&[("a", -1.0), ("\u{2581}a", -0.5)]);
    with_prefix.add_space_prefix = true;
    let t = Tokenizer::from_spm_vocab(with_prefix).unwrap();
    assert_eq!(
        t.encode("a", false, false).unwrap(),
        ids(&t, &["\u{2581}a"])
    );
    // ... and the prefix space is dropped again when decoding.
    assert_eq!(
        t.decode(&ids(&t, &["\u{2581}a", "\u{2581}a"]), true)
            .unwrap(),
        "a a"
    );
}

#[test]
fn unknown_characters_fall_back_to_bytes() {
    let t = tokenizer(&[("a", -1.0)]);
    let smile = "😀".as_bytes();
    let mut expected = vec![id(&t, "a")];
    expected.extend(smile.iter().map(|&b| byte(&t, b)));
    assert_eq!(t.encode("a😀", false, false).unwrap(), expected);
    assert_eq!(t.decode(&expected, true).unwrap(), "a😀");
}

#[test]
fn missing_byte_tokens_are_an_error_not_a_panic() {
    let v = SpmVocab {
        tokens: vec!["<bos>".into(), "a".into()],
        scores: vec![0.0, -1.0],
        token_types: vec![token_type::CONTROL, token_type::NORMAL],
        bos_id: Some(0),
        ..SpmVocab::default()
    };
    let t = Tokenizer::from_spm_vocab(v).unwrap();
    assert_eq!(t.encode("aa", true, false).unwrap(), vec![0, 1, 1]);
    assert!(matches!(
        t.encode("ab", false, false),
        Err(TokenizerError::MissingByteToken { byte: b'b' })
    ));
}

#[test]
fn bos_is_added_on_request() {
    let t = tokenizer(&[("a", -1.0)]);
    assert_eq!(t.encode("a", true, false).unwrap(), vec![2, id(&t, "a")]);
    assert_eq!(t.encode("", true, false).unwrap(), vec![2]);
    assert_eq!(t.encode("", false, true).unwrap(), Vec::<u32>::new());
    assert!(t.add_bos_default());
    assert_eq!((t.bos_id(), t.eos_id()), (Some(2), Some(1)));
}

#[test]
fn control_tokens_are_cut_out_only_when_parsing_specials() {
    let t = tokenizer(&[
        ("a", -1.0),
        ("u", -9.0),
        ("s", -9.0),
        ("e", -9.0),
        ("r", -9.0),
        ("us", -2.0),
        ("er", -2.0),
        ("user", -3.0),
    ]);
    let parsed = t
        .encode("<start_of_turn>user\na<end_of_turn>", false, true)
        .unwrap();
    assert_eq!(parsed, ids(&t, &[TURN_START, "user", "\n", "a", TURN_END]));

    // Without parsing, the marker is plain text (here: bytes), but user-defined tokens such
    // as "\n" are still matched whole, as in llama.cpp.
    let literal = t.encode("<start_of_turn>user\na", false, false).unwrap();
    // No pair inside "<start_of_turn>" is a piece, so each character stays alone.
    let mut expected: Vec<u32> = "<start_of_turn>"
        .chars()
        .map(|c| {
            t.token_id(&c.to_string())
                .unwrap_or_else(|| byte(&t, c as u8))
        })
        .collect();
    expected.extend(ids(&t, &["user", "\n", "a"]));
    assert_eq!(literal, expected);
}

#[test]
fn longer_special_tokens_win_and_matches_do_not_overlap() {
    let t = tokenizer(&[("a", -1.0)]);
    let nl = id(&t, "\n");
    let nl2 = id(&t, "\n\n");
    assert_eq!(t.encode("\n\n\n", false, false).unwrap(), vec![nl2, nl]);
    assert_eq!(
        t.encode("a\n\n\n\na", false, false).unwrap(),
        vec![id(&t, "a"), nl2, nl2, id(&t, "a")]
    );
}

#[test]
fn end_of_sequence_markers_are_control_tokens() {
    // llama.cpp promotes "</s>" (user-defined in Gemma's vocabulary) to a control token: it
    // is hidden when decoding without specials and only matched when parsing specials.
    let t = tokenizer(&[("a", -1.0)]);
    let eos_marker = id(&t, "</s>");
    assert!(t.is_control(eos_marker));
    assert!(t.is_control(2));
    assert!(!t.is_control(id(&t, "\n")));
    assert!(!t.is_control(id(&t, "a")));
    assert_eq!(t.encode("</s>", false, true).unwrap(), vec![eos_marker]);
    assert_eq!(t.encode("</s>", false, false).unwrap().len(), 4);
    assert_eq!(t.decode(&[eos_marker, id(&t, "a")], true).unwrap(), "a");
}

#[test]
fn decode_shows_or_hides_special_tokens() {
    let t = tokenizer(&[("a", -1.0), ("\u{2581}b", -1.0)]);
    let seq = [
        2,
        id(&t, TURN_START),
        id(&t, "a"),
        id(&t, "\u{2581}b"),
        id(&t, "\n"),
        3,
    ];
    assert_eq!(
        t.decode(&seq, false).unwrap(),
        "<bos><start_of_turn>a b\n<unk>"
    );
    assert_eq!(t.decode(&seq, true).unwrap(), "a b\n");
    assert_eq!(t.token_bytes(id(&t, "\u{2581}b")).unwrap(), b" b");
    assert_eq!(t.token_bytes(byte(&t, 0xF0)).unwrap(), vec![0xF0]);
    assert_eq!(t.token_to_piece(id(&t, "\u{2581}b")), Some("\u{2581}b"));
    assert!(t.token_bytes(t.vocab_size() as u32).is_none());
    assert!(matches!(
        t.decode(&[9999], true),
        Err(TokenizerError::UnknownTokenId { id: 9999, .. })
    ));
}

#[test]
fn invalid_utf8_decodes_lossily_but_decode_bytes_is_exact() {
    let t = tokenizer(&[("a", -1.0)]);
    let seq = [id(&t, "a"), byte(&t, 0xF0), byte(&t, 0x9F)];
    assert_eq!(t.decode_bytes(&seq, true).unwrap(), vec![b'a', 0xF0, 0x9F]);
    assert_eq!(t.decode(&seq, true).unwrap(), "a\u{FFFD}");
}

#[test]
fn stream_decoder_never_splits_a_character() {
    let t = tokenizer(&[("a", -1.0)]);
    let text = "a👨\u{200d}👩";
    let ids = t.encode(text, true, false).unwrap();
    assert!(ids.len() > 8, "emoji must go through byte tokens: {ids:?}");

    let mut stream = StreamDecoder::new();
    let mut pieces = Vec::new();
    for &id in &ids {
        let piece = stream.push(&t, id);
        assert!(
            !piece.contains('\u{FFFD}'),
            "half a character came out: {pieces:?}"
        );
        pieces.push(piece);
    }
    pieces.push(stream.finish());
    assert_eq!(pieces.concat(), text);
    // "a" appears as soon as it is pushed; the first emoji only once its 4th byte arrives.
    assert_eq!(pieces[1], "a");
    assert_eq!(pieces[2..5], ["", "", ""]);
    assert_eq!(pieces[5], "👨");
}

#[test]
fn stream_decoder_flushes_broken_bytes_as_replacement_characters() {
    let t = tokenizer(&[("a", -1.0)]);
    let mut stream = StreamDecoder::new();
    assert_eq!(stream.push(&t, byte(&t, 0xE2)), "");
    assert_eq!(stream.push(&t, id(&t, "a")), "\u{FFFD}a"); // the lead byte never got its tail
    assert_eq!(stream.push(&t, byte(&t, 0x80)), "\u{FFFD}"); // a lone continuation byte
    assert_eq!(stream.push(&t, byte(&t, 0xF0)), "");
    assert_eq!(stream.finish(), "\u{FFFD}");
    assert_eq!(stream.finish(), "");
    assert_eq!(stream.push(&t, 123_456), "\u{FFFD}");
}

#[test]
fn stream_decoder_hides_control_tokens_unless_asked() {
    let t = tokenizer(&[("a", -1.0)]);
    let turn_end = id(&t, TURN_END);
    let mut hidden = StreamDecoder::new();
    assert_eq!(hidden.push(&t, 2), "");
    assert_eq!(hidden.push(&t, turn_end), "");
    assert_eq!(hidden.push(&t, id(&t, "\n")), "\n");
    let mut shown = StreamDecoder::keeping_special();
    assert_eq!(shown.push(&t, turn_end), TURN_END);
}

#[test]
fn bad_vocabularies_are_rejected() {
    let mismatched = SpmVocab {
        scores: vec![0.0],
        ..vocab(&[("a", -1.0)])
    };
    assert!(matches!(
        Tokenizer::from_spm_vocab(mismatched),
        Err(TokenizerError::LengthMismatch {
            field: "scores",
            found: 1,
            ..
        })
    ));

    let mut types_short = vocab(&[("a", -1.0)]);
    types_short.token_types.pop();
    assert!(matches!(
        Tokenizer::from_spm_vocab(types_short),
        Err(TokenizerError::LengthMismatch {
            field: "token types",
            ..
        })
    ));

    let bos_out_of_range = SpmVocab {
        bos_id: Some(100_000),
        ..vocab(&[("a", -1.0)])
    };
    assert!(matches!(
        Tokenizer::from_spm_vocab(bos_out_of_range),
        Err(TokenizerError::SpecialIdOutOfRange {
            field: "bos_id",
            id: 100_000,
            ..
        })
    ));

    let no_bos = SpmVocab {
        bos_id: None,
        ..vocab(&[("a", -1.0)])
    };
    assert!(matches!(
        Tokenizer::from_spm_vocab(no_bos),
        Err(TokenizerError::MissingSpecialToken {
            flag: "add_bos",
            ..
        })
    ));

    let duplicate = vocab(&[("a", -1.0), ("a", -2.0)]);
    assert!(matches!(
        Tokenizer::from_spm_vocab(duplicate),
        Err(TokenizerError::DuplicateToken { ref piece, .. }) if piece == "a"
    ));

    let mut bad_byte = vocab(&[("a", -1.0)]);
    let last = bad_byte.tokens.len() - 1;
    bad_byte.token_types[last] = token_type::BYTE;
    assert!(matches!(
        Tokenizer::from_spm_vocab(bad_byte),
        Err(TokenizerError::BadByteToken { ref piece, .. }) if piece == "a"
    ));

    assert!(matches!(
        Tokenizer::from_spm_vocab(SpmVocab::default()),
        Err(TokenizerError::EmptyVocab)
    ));
}
