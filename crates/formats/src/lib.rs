//! Model file formats. Everything read from a file is untrusted: sizes, counts, offsets and
//! ids are checked before use and failures are typed errors naming the field.

mod dtype;
pub mod gguf;
pub mod hf;
mod resident;
mod source;
mod tensor;

pub use dtype::GgmlType;
pub use gguf::{GgufError, GgufFile, GgufTensorInfo, GgufWriteError, GgufWriter, MetaValue};
pub use hf::{HfError, HfFolder};
pub use resident::HugePageBytes;
pub use source::{open_model_source, FormatError, ModelFile};
pub use tensor::{Blob, TensorData, TensorSource};
