//! Tokenizers for Gemma models.
//!
//! - [`Tokenizer::from_gguf`] / [`Tokenizer::from_spm_vocab`]: SentencePiece-BPE from GGUF
//!   metadata, giving the same ids as llama.cpp.
//! - [`Tokenizer::from_hf_file`]: a Hugging Face `tokenizer.json` via the `tokenizers` crate.
//! - [`StreamDecoder`]: token-by-token detokenization that never splits a UTF-8 character.
//! - [`chat`]: chat templates (minijinja, plus a built-in Gemma 3 template).

pub mod chat;
mod error;
mod gguf;
mod hf;
mod special;
mod spm;
mod stream;

use std::path::Path;

pub use chat::{ChatMessage, ChatTemplate};
pub use error::TokenizerError;
pub use hf::HfTokenizer;
pub use spm::{token_type, SpmTokenizer, SpmVocab};
pub use stream::StreamDecoder;

/// A tokenizer of either kind. Ids are `u32`.
// One per loaded model, so the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Tokenizer {
    Spm(SpmTokenizer),
    Hf(Box<HfTokenizer>),
}

impl Tokenizer {
    /// Validates the vocabulary (lengths agree, special ids in range, no duplicate pieces,
    /// well-formed byte tokens) and builds the lookup tables.
    pub fn from_spm_vocab(vocab: SpmVocab) -> Result<Tokenizer, TokenizerError> {
        SpmTokenizer::new(vocab).map(Tokenizer::Spm)
    }

    /// From the `tokenizer.ggml.*` keys. Only `tokenizer.ggml.model = "llama"` is supported.
    pub fn from_gguf(file: &gemma_formats::GgufFile) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_spm_vocab(gguf::spm_vocab_from_gguf(file)?)
    }

    /// From `tokenizer.json`; `tokenizer_config` (the parsed `tokenizer_config.json`) supplies
    /// `bos_token`, `eos_token` and `add_bos_token` when given.
    pub fn from_hf_file(
        tokenizer_json: &Path,
        tokenizer_config: Option<&serde_json::Value>,
    ) -> Result<Tokenizer, TokenizerError> {
        HfTokenizer::from_file(tokenizer_json, tokenizer_config).map(|t| Tokenizer::Hf(Box::new(t)))
    }

    /// Text to ids. `add_bos` puts the BOS token first (pass [`Tokenizer::add_bos_default`] for
    /// a prompt); EOS is never added. `parse_special` makes control-token text such as
    /// `<start_of_turn>` one token; without it that text is tokenized as ordinary characters
    /// (user-defined tokens, e.g. Gemma's runs of spaces and newlines, are always matched,
    /// as in llama.cpp).
    pub fn encode(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Tokenizer::Spm(t) => t.encode(text, add_bos, parse_special),
            Tokenizer::Hf(t) => t.encode(text, add_bos, parse_special),
        }
    }

    /// Ids to text. `skip_special` drops control tokens (`<bos>`, `<end_of_turn>`, ...).
    /// Byte sequences that are not UTF-8 become U+FFFD; see [`Tokenizer::decode_bytes`].
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        match self {
            Tokenizer::Spm(t) => {
                Ok(String::from_utf8_lossy(&t.decode_bytes(ids, skip_special)?).into_owned())
            }
            Tokenizer::Hf(t) => t.decode(ids, skip_special),
        }
    }

    /// Ids to the exact bytes (llama.cpp's `llama_detokenize` for GGUF vocabularies).
    pub fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Result<Vec<u8>, TokenizerError> {
        match self {
            Tokenizer::Spm(t) => t.decode_bytes(ids, skip_special),
            Tokenizer::Hf(t) => t.decode_bytes(ids, skip_special),
        }
    }

    /// The raw bytes one token stands for (`▁` → space, `<0xNN>` → that byte, control tokens
    /// → their text). `None` for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.piece_bytes(id, false)
    }

    /// Like [`Tokenizer::token_bytes`]; with `skip_special`, control tokens give no bytes.
    pub fn piece_bytes(&self, id: u32, skip_special: bool) -> Option<Vec<u8>> {
        match self {
            Tokenizer::Spm(t) => t.piece_bytes(id, skip_special),
            Tokenizer::Hf(t) => t.piece_bytes(id, skip_special),
        }
    }

    /// The vocabulary entry as stored, e.g. `▁hello` or `<0x0A>`.
    pub fn token_to_piece(&self, id: u32) -> Option<&str> {
        match self {
            Tokenizer::Spm(t) => t.piece(id),
            Tokenizer::Hf(t) => t.piece(id),
        }
    }

    /// The id of a vocabulary entry as stored (`▁hello`, `<end_of_turn>`).
    pub fn token_id(&self, piece: &str) -> Option<u32> {
        match self {
            Tokenizer::Spm(t) => t.id_of(piece),
            Tokenizer::Hf(t) => t.id_of(piece),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Spm(t) => t.vocab_size(),
            Tokenizer::Hf(t) => t.vocab_size(),
        }
    }

    pub fn bos_id(&self) -> Option<u32> {
        match self {
            Tokenizer::Spm(t) => t.bos_id,
            Tokenizer::Hf(t) => t.bos_id,
        }
    }

    pub fn eos_id(&self) -> Option<u32> {
        match self {
            Tokenizer::Spm(t) => t.eos_id,
            Tokenizer::Hf(t) => t.eos_id,
        }
    }

    /// Whether prompts should start with BOS.
    pub fn add_bos_default(&self) -> bool {
        match self {
            Tokenizer::Spm(t) => t.add_bos,
            Tokenizer::Hf(t) => t.add_bos,
        }
    }

    /// Control tokens (GGUF type 3 plus the end-of-generation markers llama.cpp promotes, or
    /// `special` added tokens in `tokenizer.json`): never shown when skipping specials.
    pub fn is_control(&self, id: u32) -> bool {
        match self {
            Tokenizer::Spm(t) => t.attr(id).is_some_and(|a| a.is_hidden_special()),
            Tokenizer::Hf(t) => t.is_special(id),
        }
    }
}
