//! Everything that can go wrong building a tokenizer, encoding, decoding or rendering a chat
//! template. Vocabularies come from untrusted files, so every check names what it found.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("vocabulary is empty")]
    EmptyVocab,
    #[error("vocabulary has {found} {field} but {expected} tokens")]
    LengthMismatch {
        field: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("vocabulary has {size} tokens, more than token ids (u32) can address")]
    VocabTooLarge { size: usize },
    #[error("{field} = {id} is outside the vocabulary of {vocab_size} tokens")]
    SpecialIdOutOfRange {
        field: &'static str,
        id: u64,
        vocab_size: usize,
    },
    #[error("{flag} is set but the vocabulary has no {token} token")]
    MissingSpecialToken {
        flag: &'static str,
        token: &'static str,
    },
    #[error("duplicate token {piece:?} at ids {first} and {second}")]
    DuplicateToken {
        piece: String,
        first: u32,
        second: u32,
    },
    #[error("token {id} is a byte token but its text {piece:?} is not of the form <0xNN>")]
    BadByteToken { id: u32, piece: String },
    #[error("token type {value} of token {id} does not fit in i32")]
    BadTokenType { id: usize, value: i64 },
    #[error("the text needs byte 0x{byte:02X} but the vocabulary has no <0x{byte:02X}> token")]
    MissingByteToken { byte: u8 },
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    UnknownTokenId { id: u32, vocab_size: usize },
    #[error("add_bos was requested but the tokenizer has no BOS token")]
    NoBosToken,
    #[error("GGUF metadata key {key} is missing")]
    MissingKey { key: &'static str },
    #[error("tokenizer model {0:?} is not supported (only \"llama\", SentencePiece-BPE, is)")]
    UnsupportedModel(String),
    #[error(transparent)]
    Gguf(#[from] gemma_formats::GgufError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tokenizer.json: {0}")]
    HuggingFace(String),
    #[error("tokenizer_config.json: {0}")]
    Config(String),
    #[error("chat template does not parse: {0}")]
    TemplateSyntax(String),
    #[error("chat template failed: {0}")]
    TemplateRender(String),
}
