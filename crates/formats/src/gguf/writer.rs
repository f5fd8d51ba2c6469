//! Writing GGUF v3 files: used by tests to build small (or deliberately odd) files and by
//! quantization/extraction tools.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::error::GgufWriteError;
use super::reader::{align_up, MAX_ARRAY_DEPTH};
use super::value::{MetaValue, ValueType};
use super::{DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
use crate::GgmlType;

const ALIGNMENT_KEY: &str = "general.alignment";

struct PendingTensor {
    name: String,
    dtype: GgmlType,
    /// Outermost first.
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// Collects metadata and tensors, then writes a GGUF v3 file. Metadata and tensors are
/// written in the order they were added; tensor data is laid out back to back, each padded
/// to the alignment.
///
/// Metadata is written as given: a `general.alignment` entry added with
/// [`add_metadata`](Self::add_metadata) does not change the layout (that lets tests write
/// inconsistent files); use [`set_alignment`](Self::set_alignment) to change both.
pub struct GgufWriter {
    alignment: usize,
    metadata: Vec<(String, MetaValue)>,
    keys: HashSet<String>,
    tensors: Vec<PendingTensor>,
    tensor_names: HashSet<String>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter::new()
    }
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter {
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            tensor_names: HashSet::new(),
        }
    }

    /// Adds one metadata entry. Array elements must share one type (nested arrays may differ
    /// in their own element types, as GGUF allows).
    pub fn add_metadata(
        &mut self,
        key: impl Into<String>,
        value: MetaValue,
    ) -> Result<&mut Self, GgufWriteError> {
        let key = key.into();
        check_array(&key, &value, 0)?;
        if !self.keys.insert(key.clone()) {
            return Err(GgufWriteError::DuplicateKey { key });
        }
        self.metadata.push((key, value));
        Ok(self)
    }

    /// Sets the data alignment and records it as `general.alignment` (u32), replacing an
    /// existing entry in place.
    pub fn set_alignment(&mut self, alignment: usize) -> Result<&mut Self, GgufWriteError> {
        let as_u32 = u32::try_from(alignment)
            .ok()
            .filter(|a| a.is_power_of_two())
            .ok_or(GgufWriteError::BadAlignment { alignment })?;
        self.alignment = alignment;
        let value = MetaValue::U32(as_u32);
        match self.metadata.iter_mut().find(|(k, _)| k == ALIGNMENT_KEY) {
            Some(entry) => entry.1 = value,
            None => {
                self.keys.insert(ALIGNMENT_KEY.to_owned());
                self.metadata.push((ALIGNMENT_KEY.to_owned(), value));
            }
        }
        Ok(self)
    }

    /// Adds a tensor; `shape` is outermost first and `data` must be exactly
    /// `dtype.bytes_for(n_elements)` bytes.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dtype: GgmlType,
        shape: &[usize],
        data: Vec<u8>,
    ) -> Result<&mut Self, GgufWriteError> {
        let name = name.into();
        if shape.len() > MAX_DIMS {
            return Err(GgufWriteError::TooManyDims {
                name,
                n_dims: shape.len(),
                max: MAX_DIMS,
            });
        }
        let innermost = shape.last().copied().unwrap_or(1);
        let expected = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|_| innermost.is_multiple_of(dtype.block_size()))
            .and_then(|n| dtype.bytes_for(n));
        let Some(expected) = expected else {
            return Err(GgufWriteError::BadShape {
                name,
                dtype,
                shape: shape.to_vec(),
                block_size: dtype.block_size(),
            });
        };
        if data.len() != expected {
            return Err(GgufWriteError::DataSize {
                name,
                dtype,
                shape: shape.to_vec(),
                expected,
                actual: data.len(),
            });
        }
        if !self.tensor_names.insert(name.clone()) {
            return Err(GgufWriteError::DuplicateTensor { name });
        }
        self.tensors.push(PendingTensor {
            name,
            dtype,
            shape: shape.to_vec(),
            data,
        });
        Ok(self)
    }

    pub fn write_to(&self, out: &mut impl Write) -> Result<(), GgufWriteError> {
        let mut out = CountingWriter {
            inner: out,
            written: 0,
        };
        out.bytes(GGUF_MAGIC)?;
        out.u32(3)?;
        out.u64(self.tensors.len() as u64)?;
        out.u64(self.metadata.len() as u64)?;
        for (key, value) in &self.metadata {
            out.string(key)?;
            out.u32(value.value_type().id())?;
            out.value(value)?;
        }
        let mut relative_offset = 0usize;
        for tensor in &self.tensors {
            out.string(&tensor.name)?;
            out.u32(tensor.shape.len() as u32)?;
            for &dim in tensor.shape.iter().rev() {
                out.u64(dim as u64)?;
            }
            out.u32(tensor.dtype.id())?;
            out.u64(relative_offset as u64)?;
            relative_offset = align_up(relative_offset + tensor.data.len(), self.alignment);
        }
        out.pad_to(self.alignment)?;
        for tensor in &self.tensors {
            out.bytes(&tensor.data)?;
            out.pad_to(self.alignment)?;
        }
        Ok(())
    }

    pub fn write_file(&self, path: &Path) -> Result<(), GgufWriteError> {
        let io_error = |source| GgufWriteError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut out = BufWriter::new(File::create(path).map_err(io_error)?);
        self.write_to(&mut out).map_err(|e| match e {
            GgufWriteError::Write(source) => io_error(source),
            other => other,
        })?;
        out.flush().map_err(io_error)
    }
}

/// Arrays must be homogeneous and no deeper than the reader accepts.
fn check_array(key: &str, value: &MetaValue, depth: usize) -> Result<(), GgufWriteError> {
    let MetaValue::Array(items) = value else {
        return Ok(());
    };
    if depth >= MAX_ARRAY_DEPTH {
        return Err(GgufWriteError::NestingTooDeep {
            key: key.to_owned(),
            max: MAX_ARRAY_DEPTH,
        });
    }
    if let Some(first) = items.first() {
        let first_type = first.value_type();
        for item in items {
            if item.value_type() != first_type {
                return Err(GgufWriteError::MixedArray {
                    key: key.to_owned(),
                    first: first.type_name(),
                    other: item.type_name(),
                });
            }
            check_array(key, item, depth + 1)?;
        }
    }
    Ok(())
}

/// Tracks the bytes written so padding can be computed while streaming.
struct CountingWriter<'a, W: Write> {
    inner: &'a mut W,
    written: usize,
}

impl<W: Write> CountingWriter<'_, W> {
    fn bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(bytes)?;
        self.written += bytes.len();
        Ok(())
    }

    fn u32(&mut self, v: u32) -> std::io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }

    fn u64(&mut self, v: u64) -> std::io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }

    fn string(&mut self, s: &str) -> std::io::Result<()> {
        self.u64(s.len() as u64)?;
        self.bytes(s.as_bytes())
    }

    fn pad_to(&mut self, alignment: usize) -> std::io::Result<()> {
        let padding = align_up(self.written, alignment) - self.written;
        self.bytes(&vec![0u8; padding])
    }

    fn value(&mut self, value: &MetaValue) -> std::io::Result<()> {
        match value {
            MetaValue::U8(v) => self.bytes(&v.to_le_bytes()),
            MetaValue::I8(v) => self.bytes(&v.to_le_bytes()),
            MetaValue::U16(v) => self.bytes(&v.to_le_bytes()),
            MetaValue::I16(v) => self.bytes(&v.to_le_bytes()),
            MetaValue::U32(v) => self.bytes(&v.to_le_bytes()),
            MetaValue::I32(v) => self.bytes(&v.to_le_bytes()),
            MetaValue::U64(v) => self.bytes(&v.to_le_bytes()),
            MetaValue::I64(v) => self.bytes(&v.to_le_bytes()),
            MetaValue::F32(v) => self.bytes(&v.to_le_bytes()),
            MetaValue::F64(v) => self.bytes(&v.to_le_bytes()),
            MetaValue::Bool(v) => self.bytes(&[u8::from(*v)]),
            MetaValue::String(s) => self.string(s),
            MetaValue::Array(items) => {
                // An empty array carries no element type; u8 is as good as any.
                let elem_type = items.first().map_or(ValueType::U8, MetaValue::value_type);
                self.u32(elem_type.id())?;
                self.u64(items.len() as u64)?;
                items.iter().try_for_each(|item| self.value(item))
            }
        }
    }
}
