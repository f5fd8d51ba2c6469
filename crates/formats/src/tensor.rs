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
    /// The file mapping `owner` is, when it is one: its pages can be released after reading.
    mapping: Option<Arc<memmap2::Mmap>>,
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
        Blob {
            owner,
            start,
            len,
            mapping: None,
        }
    }

    /// A sub-range of a read-only file mapping, whose pages [`Blob::release`] can drop.
    #[track_caller]
    pub fn mapped(map: Arc<memmap2::Mmap>, start: usize, len: usize) -> Blob {
        Blob {
            mapping: Some(map.clone()),
            ..Blob::new(map, start, len)
        }
    }

    /// Tells the OS that bytes `start..start + len` of this blob are not needed for now: the
    /// pages of a file mapping that hold them leave the process's resident set (they stay in
    /// the page cache, and reading them again maps them back in, from the file). For a table
    /// read a few rows at a time (Gemma 3n's per-layer embeddings), so that rows read once do
    /// not stay resident. Does nothing for bytes that are not a file mapping's, or off Unix.
    pub fn release(&self, start: usize, len: usize) {
        let Some(map) = &self.mapping else { return };
        if start >= self.len {
            return;
        }
        let len = len.min(self.len - start);
        // SAFETY: the mapping is read-only and file-backed, so dropped pages are read again
        // from the file when touched: no content changes (unlike anonymous memory).
        #[cfg(unix)]
        unsafe {
            let _ = map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.start + start,
                len,
            );
        }
        #[cfg(not(unix))]
        let _ = (map, len);
    }

    /// A blob that owns its bytes (for converted or generated weights).
    pub fn from_vec(bytes: Vec<u8>) -> Blob {
        let len = bytes.len();
        Blob {
            owner: Arc::new(bytes),
            start: 0,
            len,
            mapping: None,
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
