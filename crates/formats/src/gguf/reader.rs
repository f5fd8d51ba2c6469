//! Parsing of the GGUF header (metadata and tensor infos). Every count, length, offset and id
//! comes from an untrusted file, so each is checked against the bytes that are actually
//! there before anything is allocated or indexed.

use std::collections::HashMap;
use std::fmt;

use super::error::GgufError;
use super::value::{MetaValue, ValueType};
use super::{GgufTensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
use crate::GgmlType;

/// Arrays of arrays deeper than this are refused (recursion would otherwise be driven by
/// the file and could overflow the stack).
pub(crate) const MAX_ARRAY_DEPTH: usize = 32;

/// Minimum encoded size of a metadata entry: key length (u64), value type (u32), 1 byte value.
const MIN_KV_SIZE: usize = 8 + 4 + 1;
/// Minimum encoded size of a tensor info: name length, n_dims, type, offset.
const MIN_TENSOR_INFO_SIZE: usize = 8 + 4 + 4 + 8;
/// Never reserve more entries than this up front from a file-supplied count; vectors grow as
/// entries are really parsed.
const MAX_PREALLOC: usize = 1 << 16;

/// The parsed header: everything but the tensor data.
pub(crate) struct Header {
    pub version: u32,
    pub alignment: usize,
    pub metadata: Vec<(String, MetaValue)>,
    pub key_index: HashMap<String, usize>,
    pub tensors: Vec<GgufTensorInfo>,
    pub tensor_index: HashMap<String, usize>,
    pub data_offset: usize,
}

/// Which part of the file is being read; rendered only when an error is reported.
#[derive(Clone, Copy)]
enum Field<'a> {
    Header(&'static str),
    Key(u64),
    Value(&'a str),
    TensorName(u64),
    Tensor(&'a str, &'static str),
}

impl fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Header(what) => write!(f, "header {what}"),
            Field::Key(index) => write!(f, "key of metadata entry #{index}"),
            Field::Value(key) => write!(f, "metadata '{key}'"),
            Field::TensorName(index) => write!(f, "name of tensor #{index}"),
            Field::Tensor(name, part) => write!(f, "tensor '{name}' {part}"),
        }
    }
}

/// A forward-only reader over the file bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, field: Field) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                field: field.to_string(),
                offset: self.pos,
                needed: n,
                available: self.remaining(),
            });
        }
        let slice = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, field: Field) -> Result<[u8; N], GgufError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u32(&mut self, field: Field) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: Field) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// Reads a u64 count of items that each take at least `min_item_size` bytes, and rejects
    /// counts the rest of the file cannot possibly hold.
    fn count(&mut self, field: Field, min_item_size: usize) -> Result<usize, GgufError> {
        let count = self.u64(field)?;
        let max = self.remaining() / min_item_size;
        match usize::try_from(count) {
            Ok(n) if n <= max => Ok(n),
            _ => Err(GgufError::CountTooLarge {
                field: field.to_string(),
                count,
                max,
                remaining: self.remaining(),
            }),
        }
    }

    fn string(&mut self, field: Field) -> Result<&'a str, GgufError> {
        let len = self.u64(field)?;
        let remaining = self.remaining();
        let len = match usize::try_from(len) {
            Ok(n) if n <= remaining => n,
            _ => {
                return Err(GgufError::StringTooLong {
                    field: field.to_string(),
                    len,
                    remaining,
                })
            }
        };
        let bytes = self.take(len, field)?;
        std::str::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 {
            field: field.to_string(),
        })
    }

    fn value_type(&mut self, field: Field) -> Result<ValueType, GgufError> {
        let type_id = self.u32(field)?;
        ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            field: field.to_string(),
            type_id,
        })
    }

    fn value(&mut self, ty: ValueType, field: Field, depth: usize) -> Result<MetaValue, GgufError> {
        match ty {
            ValueType::String => Ok(MetaValue::String(self.string(field)?.to_owned())),
            ValueType::Array => self.array_value(field, depth),
            scalar => {
                let size = scalar.fixed_size().unwrap_or(1);
                decode_scalar(scalar, self.take(size, field)?, field)
            }
        }
    }

    fn array_value(&mut self, field: Field, depth: usize) -> Result<MetaValue, GgufError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::NestingTooDeep {
                field: field.to_string(),
                max: MAX_ARRAY_DEPTH,
            });
        }
        let elem_type = self.value_type(field)?;
        let count = self.count(field, elem_type.min_encoded_size())?;
        // `count` is bounded by the bytes present, so reserving it is safe.
        let mut items = Vec::with_capacity(count);
        match elem_type.fixed_size() {
            Some(size) => {
                // One bounds check for the whole run of scalars; the decode loop stays tight.
                let raw = self.take(count * size, field)?;
                for chunk in raw.chunks_exact(size) {
                    items.push(decode_scalar(elem_type, chunk, field)?);
                }
            }
            None => {
                for _ in 0..count {
                    items.push(self.value(elem_type, field, depth + 1)?);
                }
            }
        }
        Ok(MetaValue::Array(items))
    }
}

/// Decodes a little-endian scalar; `raw` has exactly the type's size.
fn decode_scalar(ty: ValueType, raw: &[u8], field: Field) -> Result<MetaValue, GgufError> {
    let b = |i: usize| raw[i];
    let two = || [b(0), b(1)];
    let four = || [b(0), b(1), b(2), b(3)];
    let eight = || [b(0), b(1), b(2), b(3), b(4), b(5), b(6), b(7)];
    Ok(match ty {
        ValueType::U8 => MetaValue::U8(b(0)),
        ValueType::I8 => MetaValue::I8(b(0) as i8),
        ValueType::U16 => MetaValue::U16(u16::from_le_bytes(two())),
        ValueType::I16 => MetaValue::I16(i16::from_le_bytes(two())),
        ValueType::U32 => MetaValue::U32(u32::from_le_bytes(four())),
        ValueType::I32 => MetaValue::I32(i32::from_le_bytes(four())),
        ValueType::F32 => MetaValue::F32(f32::from_le_bytes(four())),
        ValueType::U64 => MetaValue::U64(u64::from_le_bytes(eight())),
        ValueType::I64 => MetaValue::I64(i64::from_le_bytes(eight())),
        ValueType::F64 => MetaValue::F64(f64::from_le_bytes(eight())),
        ValueType::Bool => match b(0) {
            0 => MetaValue::Bool(false),
            1 => MetaValue::Bool(true),
            byte => {
                return Err(GgufError::InvalidBool {
                    field: field.to_string(),
                    byte,
                })
            }
        },
        ValueType::String | ValueType::Array => unreachable!("not a scalar type: {ty}"),
    })
}

/// A tensor info as stored, before its data range is checked.
struct RawTensorInfo {
    name: String,
    /// GGUF order: innermost dimension first.
    ne: Vec<u64>,
    dtype: GgmlType,
    relative_offset: u64,
}

pub(crate) fn parse_header(bytes: &[u8]) -> Result<Header, GgufError> {
    let mut cur = Cursor { bytes, pos: 0 };

    let magic: [u8; 4] = cur.array(Field::Header("magic"))?;
    if &magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = cur.u32(Field::Header("version"))?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion { version });
    }
    let tensor_count = cur.count(Field::Header("tensor count"), MIN_TENSOR_INFO_SIZE)?;
    let kv_count = cur.count(Field::Header("metadata kv count"), MIN_KV_SIZE)?;

    let (metadata, key_index) = read_metadata(&mut cur, kv_count)?;
    let alignment = alignment_from(&metadata, &key_index)?;
    let raw_tensors = read_tensor_infos(&mut cur, tensor_count)?;

    let data_offset = align_up(cur.pos, alignment);
    let tensors = raw_tensors
        .into_iter()
        .map(|raw| locate_tensor(raw, data_offset, alignment, bytes.len()))
        .collect::<Result<Vec<_>, _>>()?;
    check_no_overlap(&tensors)?;
    let tensor_index = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();

    Ok(Header {
        version,
        alignment,
        metadata,
        key_index,
        tensors,
        tensor_index,
        data_offset,
    })
}

type Metadata = (Vec<(String, MetaValue)>, HashMap<String, usize>);

fn read_metadata(cur: &mut Cursor, kv_count: usize) -> Result<Metadata, GgufError> {
    let mut metadata = Vec::with_capacity(kv_count.min(MAX_PREALLOC));
    let mut key_index = HashMap::with_capacity(kv_count.min(MAX_PREALLOC));
    for i in 0..kv_count {
        let key = cur.string(Field::Key(i as u64))?;
        let field = Field::Value(key);
        let ty = cur.value_type(field)?;
        let value = cur.value(ty, field, 0)?;
        if key_index.insert(key.to_owned(), metadata.len()).is_some() {
            return Err(GgufError::DuplicateKey {
                key: key.to_owned(),
            });
        }
        metadata.push((key.to_owned(), value));
    }
    Ok((metadata, key_index))
}

fn alignment_from(
    metadata: &[(String, MetaValue)],
    key_index: &HashMap<String, usize>,
) -> Result<usize, GgufError> {
    let Some(&index) = key_index.get("general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let value = &metadata[index].1;
    let Some(alignment) = value.as_u64() else {
        return Err(GgufError::MetadataType {
            key: "general.alignment".to_owned(),
            expected: "unsigned integer",
            found: value.type_name(),
        });
    };
    match usize::try_from(alignment) {
        Ok(a) if a.is_power_of_two() => Ok(a),
        _ => Err(GgufError::BadAlignment {
            value: alignment.to_string(),
        }),
    }
}

fn read_tensor_infos(cur: &mut Cursor, count: usize) -> Result<Vec<RawTensorInfo>, GgufError> {
    let mut infos = Vec::with_capacity(count.min(MAX_PREALLOC));
    let mut seen = HashMap::with_capacity(count.min(MAX_PREALLOC));
    for i in 0..count {
        let name = cur.string(Field::TensorName(i as u64))?;
        if seen.insert(name, i).is_some() {
            return Err(GgufError::DuplicateTensorName {
                name: name.to_owned(),
            });
        }
        let n_dims = cur.u32(Field::Tensor(name, "n_dims"))?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                name: name.to_owned(),
                n_dims,
                max: MAX_DIMS,
            });
        }
        let ne = (0..n_dims)
            .map(|_| cur.u64(Field::Tensor(name, "dimensions")))
            .collect::<Result<Vec<_>, _>>()?;
        let type_id = cur.u32(Field::Tensor(name, "type"))?;
        let dtype = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            name: name.to_owned(),
            type_id,
        })?;
        let relative_offset = cur.u64(Field::Tensor(name, "offset"))?;
        infos.push(RawTensorInfo {
            name: name.to_owned(),
            ne,
            dtype,
            relative_offset,
        });
    }
    Ok(infos)
}

/// Checks the shape, size and data range of one tensor and turns it into its public form.
fn locate_tensor(
    raw: RawTensorInfo,
    data_offset: usize,
    alignment: usize,
    file_size: usize,
) -> Result<GgufTensorInfo, GgufError> {
    let RawTensorInfo {
        name,
        ne,
        dtype,
        relative_offset,
    } = raw;
    // ggml stores dimensions as int64, so each must also fit in i64.
    let n_elements = ne
        .iter()
        .try_fold(1u64, |acc, &d| {
            i64::try_from(d).ok()?;
            acc.checked_mul(d)
        })
        .filter(|&n| i64::try_from(n).is_ok())
        .and_then(|n| usize::try_from(n).ok());
    let Some(n_elements) = n_elements else {
        return Err(GgufError::ShapeOverflow { name, dims: ne });
    };
    let ne0 = ne.first().copied().unwrap_or(1);
    if !ne0.is_multiple_of(dtype.block_size() as u64) {
        return Err(GgufError::PartialBlock {
            name,
            dtype,
            ne0,
            block_size: dtype.block_size(),
        });
    }
    let Some(n_bytes) = dtype.bytes_for(n_elements) else {
        return Err(GgufError::ShapeOverflow { name, dims: ne });
    };
    if !relative_offset.is_multiple_of(alignment as u64) {
        return Err(GgufError::MisalignedOffset {
            name,
            offset: relative_offset,
            alignment,
        });
    }
    // u128 cannot overflow here: every term is below 2^64.
    let start = data_offset as u128 + relative_offset as u128;
    let end = start + n_bytes as u128;
    if end > file_size as u128 {
        return Err(GgufError::OutOfBounds {
            name,
            start,
            end,
            file_size,
        });
    }
    Ok(GgufTensorInfo {
        name,
        dtype,
        shape: ne.iter().rev().map(|&d| d as usize).collect(),
        offset: start as usize,
        n_bytes,
    })
}

fn check_no_overlap(tensors: &[GgufTensorInfo]) -> Result<(), GgufError> {
    let mut ranges: Vec<&GgufTensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    ranges.sort_unstable_by_key(|t| t.offset);
    for pair in ranges.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.offset + a.n_bytes > b.offset {
            return Err(GgufError::OverlappingTensors {
                first: a.name.clone(),
                first_start: a.offset,
                first_end: a.offset + a.n_bytes,
                second: b.name.clone(),
                second_start: b.offset,
                second_end: b.offset + b.n_bytes,
            });
        }
    }
    Ok(())
}

/// Rounds `pos` up to a multiple of `alignment` (a power of two), saturating: a data section
/// that would start past `usize::MAX` holds no tensor that fits in the file anyway.
pub(crate) fn align_up(pos: usize, alignment: usize) -> usize {
    pos.checked_next_multiple_of(alignment)
        .unwrap_or(usize::MAX)
}
