use gemma_formats::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unsupported architecture '{0}' (supported: gemma2, gemma3, gemma3n)")]
    UnknownArchitecture(String),
    #[error("model config: {0}")]
    Config(String),
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor '{name}' has type {dtype}, which cannot be used here")]
    TensorType { name: String, dtype: GgmlType },
    #[error("the input needs {needed} positions but the context size is {ctx_size}")]
    ContextOverflow { needed: usize, ctx_size: usize },
    #[error(
        "cannot allocate {bytes} bytes for {what}: the machine refused (use a smaller --ctx-size)"
    )]
    OutOfMemory { what: &'static str, bytes: usize },
    #[error(
        "the forward pass produced non-finite values (NaN or infinity) first in {where_}: the \
         model's weights or config are broken"
    )]
    NonFinite { where_: String },
    #[error("token id {id} is outside the vocabulary ({vocab} tokens)")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("{0}")]
    Format(#[from] gemma_formats::GgufError),
}
