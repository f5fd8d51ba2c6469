//! Format-neutral view of a stored tensor: what model code receives from any file format.

use std::ops::Deref;
use std::sync::Arc;

use crate::GgmlType;

/// Bytes that live as long as the mapping (or buffer) they come from, without copying.
#[derive(Clone)]
pub struct Blob {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl Blob {
    /// A sub-range of `owner`. Panics if the range is outside `owner` (callers validate first).
    #[track_caller]
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, start: usize, len: usize) -> Blob {
        let total = (*owner).as_ref().len();
        assert!(
            start.checked_add(len).is_some_and(|end| end <= total),
            "blob range {start}+{len} outside {total} bytes"
        );
        Blob { owner, start, len }
    }

    /// A blob that owns its bytes (for converted or generated weights).
    pub fn from_vec(bytes: Vec<u8>) -> Blob {
        let len = bytes.len();
        Blob {
            owner: Arc::new(bytes),
            start: 0,
            len,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }
}

impl Deref for Blob {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes()
    }
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob({} bytes)", self.len)
    }
}

/// A tensor as stored: element type, shape with the **outermost dimension first**
/// (PyTorch order, e.g. `[out_features, in_features]`; GGUF's `ne` reversed), and raw bytes.
#[derive(Clone, Debug)]
pub struct TensorData {
    pub dtype: GgmlType,
    pub shape: Vec<usize>,
    pub data: Blob,
    /// The rows are stored in groups of eight, block by block, for the decode kernels
    /// (`gemma_kernels::quant::interleave`), not row after row: see
    /// [`crate::GgufFile::interleave_tensors`]. Never set by a file as stored.
    pub interleaved: bool,
}

impl TensorData {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Anything that can hand out tensors by name: a GGUF file, a safetensors folder.
pub trait TensorSource: Send + Sync {
    /// The tensor stored under `name`, or `None` if the file has no such tensor.
    fn tensor(&self, name: &str) -> Option<TensorData>;
    /// All tensor names, in file order.
    fn tensor_names(&self) -> Vec<String>;
}
