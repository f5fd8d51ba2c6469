//! GGUF: read (zero-copy over a memory map) and write.
//!
//! Layout of a GGUF v2/v3 file (all integers little-endian):
//!
//! ```text
//! magic        4 bytes  "GGUF"
//! version      u32      2 or 3 (v1 used 32-bit counts and is not supported)
//! tensor_count u64
//! kv_count     u64
//! kv_count × metadata entry:
//!     key      string   (u64 byte length + UTF-8 bytes, no terminator)
//!     type     u32      value type id (0 u8 … 12 f64; 8 string; 9 array)
//!     value             scalar, string, or array = element type u32 + count u64 + elements
//! tensor_count × tensor info:
//!     name     string
//!     n_dims   u32      at most 4
//!     ne       n_dims × u64, innermost dimension first (the reverse of PyTorch order)
//!     type     u32      ggml type id (see `GgmlType::id`)
//!     offset   u64      relative to the data section, a multiple of the alignment
//! padding to `general.alignment` (default 32)
//! data section: each tensor's bytes at its offset, padded to the alignment
//! ```
//!
//! The reader treats the file as hostile: every count is bounded by the bytes left, every
//! range is checked against the file size, and failures are [`GgufError`]s naming the field.

mod error;
mod reader;
mod value;
mod writer;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::{GgufError, GgufWriteError};
pub use value::MetaValue;
pub use writer::GgufWriter;

use crate::{Blob, GgmlType, HugePageBytes, TensorData, TensorSource};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// Most dimensions a ggml tensor can have (`GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

/// Where one tensor lives in a GGUF file. Validated on open: its bytes lie inside the file,
/// are aligned, and overlap no other tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    pub dtype: GgmlType,
    /// Outermost dimension first (GGUF's `ne` reversed).
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    pub n_bytes: usize,
}

impl GgufTensorInfo {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An opened, fully validated GGUF file. Tensor data is not copied: it is handed out as
/// [`Blob`]s that share the underlying mapping (or, after [`GgufFile::make_resident`], the
/// resident copy of the data section).
pub struct GgufFile {
    /// The bytes tensors are read from: the whole file, or from `data_base` on.
    data: Arc<dyn AsRef<[u8]> + Send + Sync>,
    /// File offset of `data[0]`.
    data_base: usize,
    file_size: usize,
    /// The file behind the mapping, for [`GgufFile::make_resident`]; `None` for images built
    /// in memory.
    file: Option<(File, PathBuf)>,
    version: u32,
    alignment: usize,
    metadata: Vec<(String, MetaValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_offset: usize,
    /// The resident copy behind `data` (after [`GgufFile::make_resident`]), kept typed so that
    /// [`GgufFile::interleave_tensors`] can rewrite it in place.
    resident: Option<Arc<HugePageBytes>>,
    /// The mapping behind `data` (after [`GgufFile::open`]), to release pages copied out of it.
    mapping: Option<Arc<memmap2::Mmap>>,
    /// Per tensor: its bytes when they were moved out of the mapping, and whether they are
    /// interleaved (see [`GgufFile::interleave_tensors`]).
    rewritten: Vec<Option<Blob>>,
    interleaved: Vec<bool>,
    /// Original lengths of the arrays [`GgufFile::elide_long_arrays`] freed.
    elided: HashMap<String, usize>,
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let io_error = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_error)?;
        // SAFETY: the mapping is read-only. Like every mmap-based reader, we rely on the
        // model file not being truncated or rewritten while it is open.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(io_error)?);
        let mut gguf = GgufFile::from_bytes(map.clone())?;
        gguf.file = Some((file, path.to_path_buf()));
        gguf.mapping = Some(map);
        Ok(gguf)
    }

    /// Parses a GGUF image already in memory (or mapped).
    pub fn from_bytes(bytes: Arc<dyn AsRef<[u8]> + Send + Sync>) -> Result<GgufFile, GgufError> {
        let header = reader::parse_header((*bytes).as_ref())?;
        Ok(GgufFile {
            file_size: (*bytes).as_ref().len(),
            data: bytes,
            data_base: 0,
            file: None,
            version: header.version,
            alignment: header.alignment,
            metadata: header.metadata,
            key_index: header.key_index,
            rewritten: vec![None; header.tensors.len()],
            interleaved: vec![false; header.tensors.len()],
            tensor_index: header.tensor_index,
            tensors: header.tensors,
            data_offset: header.data_offset,
            resident: None,
            mapping: None,
            elided: HashMap::new(),
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Absolute offset of the data section (end of header, rounded up to the alignment).
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    pub fn file_size(&self) -> usize {
        self.file_size
    }

    /// Copies the data section out of the mapping into memory of its own, backed by huge
    /// pages where the OS allows (see `resident.rs`), and drops the mapping. Tensors handed
    /// out afterwards read the copy; call it before loading a model. Returns `false` (and
    /// changes nothing) for a file built in memory or already resident.
    pub fn make_resident(&mut self) -> Result<bool, GgufError> {
        self.make_resident_with_progress(&mut |_, _| {})
    }

    /// [`GgufFile::make_resident`], calling `progress(copied, total)` in bytes as the copy
    /// advances.
    pub fn make_resident_with_progress(
        &mut self,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<bool, GgufError> {
        let Some((file, path)) = self.file.take() else {
            return Ok(false);
        };
        let len = self.file_size.saturating_sub(self.data_offset);
        let copy =
            HugePageBytes::read_with_progress(&file, self.data_offset as u64, len, &mut |done| {
                progress(done, len)
            })
            .map_err(|source| GgufError::Io {
                path: path.clone(),
                source,
            })?;
        let copy = Arc::new(copy);
        self.data = copy.clone();
        self.resident = Some(copy);
        self.mapping = None;
        self.data_base = self.data_offset;
        Ok(true)
    }

    /// Rewrites the bytes of every tensor that `choose` picks with `rewrite` (which keeps
    /// their length) and hands them out marked [`TensorData::interleaved`] from then on: the
    /// decode layout of the weight matrices, which this crate does not know itself. Returns
    /// the bytes rewritten. Call it before any tensor is handed out.
    ///
    /// A resident file is rewritten in place (no extra memory). A mapped file cannot be, so the
    /// chosen tensors are copied into memory of their own (huge pages) and their pages of the
    /// mapping released: what stays resident is the same bytes as before, in the new order, so
    /// choose only tensors that are read whole anyway (a matrix, not a table read by rows).
    /// A file built in memory is not rewritten (returns 0).
    pub fn interleave_tensors(
        &mut self,
        choose: &dyn Fn(&GgufTensorInfo) -> bool,
        rewrite: &(dyn Fn(&GgufTensorInfo, &mut [u8]) + Sync),
    ) -> Result<usize, GgufError> {
        let chosen: Vec<usize> = (0..self.tensors.len())
            .filter(|&i| !self.interleaved[i] && choose(&self.tensors[i]))
            .collect();
        if chosen.is_empty() {
            return Ok(0);
        }
        if let Some(mut resident) = self.resident.take() {
            // Only `data` may share the copy: no tensor was handed out yet.
            self.data = Arc::new(Vec::<u8>::new());
            let Some(bytes) = Arc::get_mut(&mut resident) else {
                self.data = resident.clone();
                self.resident = Some(resident);
                return Err(GgufError::TensorsInUse);
            };
            let mut done = 0;
            for &i in &chosen {
                let info = &self.tensors[i];
                let start = info.offset - self.data_base;
                rewrite(info, &mut bytes.as_mut()[start..start + info.n_bytes]);
                self.interleaved[i] = true;
                done += info.n_bytes;
            }
            self.data = resident.clone();
            self.resident = Some(resident);
            return Ok(done);
        }
        let Some(mapping) = self.mapping.clone() else {
            return Ok(0);
        };
        let total: usize = chosen.iter().map(|&i| self.tensors[i].n_bytes).sum();
        let mut copy = HugePageBytes::zeroed(total).map_err(|source| GgufError::Io {
            path: self.file.as_ref().map(|f| f.1.clone()).unwrap_or_default(),
            source,
        })?;
        // Each tensor's place in the copy; then the tensors are copied and rewritten on every
        // core (page faults on the new memory and the file cost more than the rewrite).
        let mut placed = Vec::with_capacity(chosen.len());
        let mut parts = Vec::with_capacity(chosen.len());
        let mut rest = copy.as_mut();
        for &i in &chosen {
            let (part, tail) = rest.split_at_mut(self.tensors[i].n_bytes);
            placed.push((i, total - tail.len() - part.len()));
            parts.push((&self.tensors[i], part));
            rest = tail;
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_thread = total.div_ceil(threads).max(1);
        let mut shares: Vec<Vec<(&GgufTensorInfo, &mut [u8])>> = vec![];
        let mut share_bytes = per_thread;
        for part in parts {
            if share_bytes >= per_thread {
                shares.push(vec![]);
                share_bytes = 0;
            }
            share_bytes += part.1.len();
            shares.last_mut().expect("pushed above").push(part);
        }
        let mapping = &mapping;
        std::thread::scope(|scope| {
            for share in shares {
                scope.spawn(move || {
                    for (info, dst) in share {
                        dst.copy_from_slice(&mapping[info.offset..info.offset + info.n_bytes]);
                        rewrite(info, dst);
                        // SAFETY: the mapping is read-only and file-backed: dropped pages are
                        // read again from the file if anything touches them (nothing should:
                        // the copy replaces them).
                        #[cfg(unix)]
                        unsafe {
                            let _ = mapping.unchecked_advise_range(
                                memmap2::UncheckedAdvice::DontNeed,
                                info.offset,
                                info.n_bytes,
                            );
                        }
                    }
                });
            }
        });
        let copy: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(copy);
        for (i, start) in placed {
            self.rewritten[i] = Some(Blob::new(copy.clone(), start, self.tensors[i].n_bytes));
            self.interleaved[i] = true;
        }
        Ok(total)
    }

    /// Frees the metadata arrays longer than `max_len` elements (the tokenizer's vocabulary,
    /// scores and token types: about 30 MB for Gemma's 262,144 tokens, held as one
    /// [`MetaValue`] per element) once what reads them, the tokenizer, has been built. Their
    /// keys stay, holding empty arrays, and [`GgufFile::elided_len`] gives their original
    /// length. Returns the number of arrays freed.
    pub fn elide_long_arrays(&mut self, max_len: usize) -> usize {
        let mut freed = 0;
        for (key, value) in self.metadata.iter_mut() {
            if let MetaValue::Array(items) = value {
                if items.len() > max_len {
                    self.elided.insert(key.clone(), items.len());
                    *items = Vec::new();
                    freed += 1;
                }
            }
        }
        freed
    }

    /// The length `key`'s array had before [`GgufFile::elide_long_arrays`] freed it.
    pub fn elided_len(&self, key: &str) -> Option<usize> {
        self.elided.get(key).copied()
    }

    /// Whether tensors are read from a resident copy rather than the file mapping.
    pub fn is_resident(&self) -> bool {
        // The data section never starts at 0: the header comes first.
        self.data_base != 0
    }

    /// All metadata entries in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Looks `key` up and converts it with `convert`; a present value that does not convert
    /// is a [`GgufError::MetadataType`].
    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        convert: impl FnOnce(&'a MetaValue) -> Option<T>,
    ) -> Result<Option<T>, GgufError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        match convert(value) {
            Some(v) => Ok(Some(v)),
            None => Err(GgufError::MetadataType {
                key: key.to_owned(),
                expected,
                found: describe(value),
            }),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.typed(key, "string", MetaValue::as_str)
    }

    /// Any integer type holding a non-negative value.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.typed(key, "non-negative integer", MetaValue::as_u64)
    }

    /// `f32`, or `f64` narrowed to `f32`.
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        self.typed(key, "float", MetaValue::as_f32)
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.typed(key, "bool", MetaValue::as_bool)
    }

    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>, GgufError> {
        self.typed(key, "array of string", |v| {
            v.as_array()?.iter().map(MetaValue::as_str).collect()
        })
    }

    /// Elements of type `f32` or `f64`.
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>, GgufError> {
        self.typed(key, "array of float", |v| {
            v.as_array()?.iter().map(MetaValue::as_f32).collect()
        })
    }

    /// Elements of any integer type whose values fit in `i64`.
    pub fn get_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>, GgufError> {
        self.typed(key, "array of integer", |v| {
            v.as_array()?.iter().map(MetaValue::as_i64).collect()
        })
    }

    /// `general.architecture`, e.g. `gemma3`.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")?
            .ok_or_else(|| GgufError::MissingKey {
                key: "general.architecture".to_owned(),
            })
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor, without copying.
    ///
    /// # Panics
    /// If `info` does not come from this file and its range lies outside it.
    #[track_caller]
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> Blob {
        if let Some(Some(blob)) = self
            .tensor_index
            .get(&info.name)
            .map(|&i| &self.rewritten[i])
        {
            return blob.clone();
        }
        if let (Some(map), false) = (&self.mapping, self.is_resident()) {
            return Blob::mapped(map.clone(), info.offset, info.n_bytes);
        }
        Blob::new(
            self.data.clone(),
            info.offset.wrapping_sub(self.data_base),
            info.n_bytes,
        )
    }
}

/// Type description for errors; names the offending value for negative or oversized integers.
fn describe(value: &MetaValue) -> String {
    match value {
        MetaValue::I8(_) | MetaValue::I16(_) | MetaValue::I32(_) | MetaValue::I64(_)
            if value.as_i64().is_some_and(|v| v < 0) =>
        {
            format!(
                "{} with negative value {}",
                value.type_name(),
                value.as_i64().unwrap_or(0)
            )
        }
        _ => value.type_name(),
    }
}

impl TensorSource for GgufFile {
    fn tensor(&self, name: &str) -> Option<TensorData> {
        let info = self.tensor_info(name)?;
        Some(TensorData {
            dtype: info.dtype,
            shape: info.shape.clone(),
            data: self.tensor_data(info),
            interleaved: self
                .tensor_index
                .get(name)
                .is_some_and(|&i| self.interleaved[i]),
        })
    }

    fn tensor_names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.name.clone()).collect()
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("file_size", &self.file_size())
            .field("alignment", &self.alignment)
            .field("metadata_entries", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}
