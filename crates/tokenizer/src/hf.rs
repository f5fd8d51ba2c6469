//! Hugging Face `tokenizer.json` through the `tokenizers` crate, with BOS/EOS taken from
//! `tokenizer_config.json` when given.

use std::path::Path;
use std::sync::OnceLock;

use tokenizers::DecoderWrapper;

use crate::spm::parse_byte_piece;
use crate::TokenizerError;

#[derive(Debug)]
pub struct HfTokenizer {
    /// Splits special tokens out of the text (the `tokenizers` default).
    parsing_special: tokenizers::Tokenizer,
    /// A copy that treats special-token text as plain text; made on first use.
    literal_special: OnceLock<tokenizers::Tokenizer>,
    /// id → piece, added tokens included (the crate only hands out owned strings).
    pieces: Vec<String>,
    /// Added tokens flagged `special` (hidden when decoding with `skip_special`).
    special: Vec<bool>,
    byte_level: bool,
    pub(crate) bos_id: Option<u32>,
    pub(crate) eos_id: Option<u32>,
    pub(crate) add_bos: bool,
}

impl HfTokenizer {
    pub fn from_file(
        tokenizer_json: &Path,
        tokenizer_config: Option<&serde_json::Value>,
    ) -> Result<HfTokenizer, TokenizerError> {
        let bytes = std::fs::read(tokenizer_json).map_err(|source| TokenizerError::Io {
            path: tokenizer_json.to_path_buf(),
            source,
        })?;
        HfTokenizer::from_bytes(&bytes, tokenizer_config)
    }

    /// The contents of a `tokenizer.json`. The `tokenizers` crate panics on some malformed
    /// files (e.g. a broken `decoder`); that becomes an error here.
    pub fn from_bytes(
        tokenizer_json: &[u8],
        tokenizer_config: Option<&serde_json::Value>,
    ) -> Result<HfTokenizer, TokenizerError> {
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(tokenizer_json))
            .map_err(|_| broken())?;
        let inner = parsed.map_err(hf_error)?;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            HfTokenizer::new(inner, tokenizer_config)
        }))
        .map_err(|_| broken())?
    }

    pub fn new(
        inner: tokenizers::Tokenizer,
        config: Option<&serde_json::Value>,
    ) -> Result<HfTokenizer, TokenizerError> {
        let size = inner.get_vocab_size(true);
        let mut pieces = vec![String::new(); size];
        for (piece, id) in inner.get_vocab(true) {
            let slot = pieces.get_mut(id as usize).ok_or_else(|| {
                TokenizerError::HuggingFace(format!(
                    "token {piece:?} has id {id} beyond the vocabulary size {size}"
                ))
            })?;
            *slot = piece;
        }
        let mut special = vec![false; size];
        for (id, token) in inner.get_added_tokens_decoder() {
            if let Some(flag) = special.get_mut(id as usize) {
                *flag = token.special;
            }
        }
        let byte_level = decoder_is_byte_level(inner.get_decoder());

        let bos_id = special_token_id(&inner, config, "bos_token")?;
        let eos_id = special_token_id(&inner, config, "eos_token")?;
        let add_bos = match config.and_then(|c| c.get("add_bos_token")) {
            Some(serde_json::Value::Bool(flag)) => *flag,
            Some(other) => {
                return Err(TokenizerError::Config(format!(
                    "add_bos_token must be a bool, found {other}"
                )))
            }
            // Without a config, follow what the post-processor does with special tokens on.
            None => {
                let probe = inner.encode("", true).map_err(hf_error)?;
                bos_id.is_some() && probe.get_ids().first() == bos_id.as_ref()
            }
        };
        if add_bos && bos_id.is_none() {
            return Err(TokenizerError::MissingSpecialToken {
                flag: "add_bos_token",
                token: "BOS",
            });
        }
        Ok(HfTokenizer {
            parsing_special: inner,
            literal_special: OnceLock::new(),
            pieces,
            special,
            byte_level,
            bos_id,
            eos_id,
            add_bos,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    pub fn id_of(&self, piece: &str) -> Option<u32> {
        self.parsing_special.token_to_id(piece)
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Special tokens are never added by the `tokenizers` post-processor here; BOS is added
    /// explicitly so that `add_bos` means the same for every tokenizer kind.
    pub fn encode(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let tokenizer = if parse_special {
            &self.parsing_special
        } else {
            self.literal_special.get_or_init(|| {
                let mut copy = self.parsing_special.clone();
                copy.set_encode_special_tokens(true);
                copy
            })
        };
        // `tokenizers` 0.23 panics on some malformed files only when it encodes (a template
        // naming a special token it does not define): an error here, not a crash.
        let encoding = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tokenizer.encode(text, false)
        }))
        .map_err(|_| broken())?
        .map_err(hf_error)?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if add_bos {
            ids.push(self.bos_id.ok_or(TokenizerError::NoBosToken)?);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.check_ids(ids)?;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.parsing_special.decode(ids, skip_special)
        }))
        .map_err(|_| broken())?
        .map_err(hf_error)
    }

    /// Raw bytes of one piece: `▁` as space and `<0xNN>` as the byte for SentencePiece-style
    /// vocabularies, the GPT-2 byte alphabet undone for byte-level ones, added tokens verbatim.
    pub fn piece_bytes(&self, id: u32, skip_special: bool) -> Option<Vec<u8>> {
        let piece = self.pieces.get(id as usize)?;
        if self.is_special(id) {
            return Some(if skip_special {
                Vec::new()
            } else {
                piece.clone().into_bytes()
            });
        }
        if self.byte_level {
            return Some(
                piece
                    .chars()
                    .map(byte_level_char_to_byte)
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| piece.clone().into_bytes()),
            );
        }
        if let Some(byte) = parse_byte_piece(piece) {
            return Some(vec![byte]);
        }
        Some(piece.replace('\u{2581}', " ").into_bytes())
    }

    pub fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Result<Vec<u8>, TokenizerError> {
        self.check_ids(ids)?;
        Ok(ids
            .iter()
            .flat_map(|&id| self.piece_bytes(id, skip_special).unwrap_or_default())
            .collect())
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), TokenizerError> {
        match ids.iter().find(|&&id| id as usize >= self.pieces.len()) {
            Some(&id) => Err(TokenizerError::UnknownTokenId {
                id,
                vocab_size: self.pieces.len(),
            }),
            None => Ok(()),
        }
    }
}

fn hf_error(e: tokenizers::Error) -> TokenizerError {
    TokenizerError::HuggingFace(e.to_string())
}

/// `bos_token` / `eos_token` from the config (a string or `{"content": ...}`), else the
/// conventional Gemma piece if the vocabulary has it.
fn special_token_id(
    inner: &tokenizers::Tokenizer,
    config: Option<&serde_json::Value>,
    key: &'static str,
) -> Result<Option<u32>, TokenizerError> {
    let configured = config.and_then(|c| c.get(key)).filter(|v| !v.is_null());
    let text = match configured {
        Some(serde_json::Value::String(s)) => s.as_str(),
        Some(value) => match value.get("content").and_then(|c| c.as_str()) {
            Some(s) => s,
            None => {
                return Err(TokenizerError::Config(format!(
                    "{key} must be a string or {{\"content\": ...}}, found {value}"
                )))
            }
        },
        None => {
            let fallback = if key == "bos_token" { "<bos>" } else { "<eos>" };
            return Ok(inner.token_to_id(fallback));
        }
    };
    inner
        .token_to_id(text)
        .map(Some)
        .ok_or_else(|| TokenizerError::Config(format!("{key} {text:?} is not in the vocabulary")))
}

fn decoder_is_byte_level(decoder: Option<&DecoderWrapper>) -> bool {
    match decoder {
        Some(DecoderWrapper::ByteLevel(_)) => true,
        Some(DecoderWrapper::Sequence(seq)) => seq
            .get_decoders()
            .iter()
            .any(|d| decoder_is_byte_level(Some(d))),
        _ => false,
    }
}

/// Inverse of GPT-2's byte → printable character table: printable Latin-1 bytes stand for
/// themselves; the other 68 bytes were shifted to U+0100.. in byte order.
fn byte_level_char_to_byte(c: char) -> Option<u8> {
    let is_printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let code = c as u32;
    if code < 0x100 {
        return is_printable(code).then_some(code as u8);
    }
    let shifted_index = code.checked_sub(0x100)? as usize;
    (0u32..=0xFF)
        .filter(|&b| !is_printable(b))
        .nth(shifted_index)
        .map(|b| b as u8)
}

/// What a panic inside `tokenizers` becomes.
fn broken() -> TokenizerError {
    TokenizerError::HuggingFace(
        "tokenizer.json is malformed (the tokenizers library crashed)".into(),
    )
}
