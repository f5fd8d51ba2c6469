//! Everything that can go wrong reading or writing GGUF. Each message names the field.

use std::path::PathBuf;

use thiserror::Error;

use crate::GgmlType;

/// A GGUF file could not be read, or a metadata value has the wrong type.
#[derive(Debug, Error)]
pub enum GgufError {
    #[error("cannot read GGUF file '{path}': {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a GGUF file: magic is {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("GGUF tensors cannot be rewritten once some were handed out (a caller bug)")]
    TensorsInUse,
    #[error("GGUF version {version} is not supported (only versions 2 and 3 are)")]
    UnsupportedVersion { version: u32 },
    #[error("{field}: needs {needed} bytes at offset {offset} but only {available} remain (file truncated?)")]
    Truncated {
        field: String,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error(
        "{field}: count {count} is impossible, the remaining {remaining} bytes hold at most {max}"
    )]
    CountTooLarge {
        field: String,
        count: u64,
        max: usize,
        remaining: usize,
    },
    #[error("{field}: string length {len} exceeds the remaining {remaining} bytes")]
    StringTooLong {
        field: String,
        len: u64,
        remaining: usize,
    },
    #[error("{field}: string is not valid UTF-8")]
    InvalidUtf8 { field: String },
    #[error("{field}: bool byte is {byte}, expected 0 or 1")]
    InvalidBool { field: String, byte: u8 },
    #[error("{field}: unknown value type id {type_id}")]
    UnknownValueType { field: String, type_id: u32 },
    #[error("{field}: arrays are nested deeper than {max} levels")]
    NestingTooDeep { field: String, max: usize },
    #[error("metadata key '{key}' appears more than once")]
    DuplicateKey { key: String },
    #[error("general.alignment: {value} is not a nonzero power of two")]
    BadAlignment { value: String },
    #[error("tensor '{name}': n_dims is {n_dims}, at most {max} are allowed")]
    TooManyDims {
        name: String,
        n_dims: u32,
        max: usize,
    },
    #[error("tensor '{name}': unknown ggml type id {type_id}")]
    UnknownTensorType { name: String, type_id: u32 },
    #[error("tensor '{name}': dimensions {dims:?} overflow the element count")]
    ShapeOverflow { name: String, dims: Vec<u64> },
    #[error("tensor '{name}': innermost dimension {ne0} is not a multiple of the {dtype} block size {block_size}")]
    PartialBlock {
        name: String,
        dtype: GgmlType,
        ne0: u64,
        block_size: usize,
    },
    #[error("tensor '{name}': offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedOffset {
        name: String,
        offset: u64,
        alignment: usize,
    },
    #[error("tensor '{name}': data range {start}..{end} is past the end of the file ({file_size} bytes)")]
    OutOfBounds {
        name: String,
        start: u128,
        end: u128,
        file_size: usize,
    },
    #[error("tensors '{first}' (bytes {first_start}..{first_end}) and '{second}' (bytes {second_start}..{second_end}) overlap")]
    OverlappingTensors {
        first: String,
        first_start: usize,
        first_end: usize,
        second: String,
        second_start: usize,
        second_end: usize,
    },
    #[error("tensor name '{name}' appears more than once")]
    DuplicateTensorName { name: String },
    #[error("metadata key '{key}' has type {found}, expected {expected}")]
    MetadataType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("required metadata key '{key}' is missing")]
    MissingKey { key: String },
}

/// A [`GgufWriter`](super::GgufWriter) was given something it cannot write.
#[derive(Debug, Error)]
pub enum GgufWriteError {
    #[error("cannot write GGUF file '{path}': {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write failed: {0}")]
    Write(#[from] std::io::Error),
    #[error("metadata key '{key}' was added twice")]
    DuplicateKey { key: String },
    #[error(
        "metadata '{key}': array elements must all have the same type, found {first} and {other}"
    )]
    MixedArray {
        key: String,
        first: String,
        other: String,
    },
    #[error("metadata '{key}': arrays are nested deeper than {max} levels")]
    NestingTooDeep { key: String, max: usize },
    #[error("alignment {alignment} is not a nonzero power of two that fits in u32")]
    BadAlignment { alignment: usize },
    #[error("tensor '{name}' was added twice")]
    DuplicateTensor { name: String },
    #[error("tensor '{name}': {n_dims} dimensions, at most {max} are allowed")]
    TooManyDims {
        name: String,
        n_dims: usize,
        max: usize,
    },
    #[error("tensor '{name}': shape {shape:?} does not fit {dtype} (innermost dimension must be a multiple of {block_size}, element count must not overflow)")]
    BadShape {
        name: String,
        dtype: GgmlType,
        shape: Vec<usize>,
        block_size: usize,
    },
    #[error("tensor '{name}': {dtype} {shape:?} needs {expected} bytes, got {actual}")]
    DataSize {
        name: String,
        dtype: GgmlType,
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
}
