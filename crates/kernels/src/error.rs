use gemma_formats::GgmlType;
use thiserror::Error;

/// Errors from kernels given buffers whose sizes do not fit the element type.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// `values` is not a whole number of `dtype` blocks.
    #[error("{values} values are not a whole number of {dtype} blocks of {block_size}")]
    NotWholeBlocks {
        dtype: GgmlType,
        values: usize,
        block_size: usize,
    },
    /// The byte buffer does not hold exactly `values` elements of `dtype`.
    #[error("{dtype}: {values} values need {expected} bytes, got {actual}")]
    ByteLength {
        dtype: GgmlType,
        values: usize,
        expected: usize,
        actual: usize,
    },
    /// A weight matrix whose data length or shape does not fit its type.
    #[error("{dtype} weight matrix {rows}x{cols}: {reason}")]
    WeightShape {
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        reason: String,
    },
    /// Quantizing to this type is not implemented (K-quant weights are only read, never written).
    #[error("quantizing to {0} is not supported")]
    QuantizeUnsupported(GgmlType),
}

/// Bytes `values` elements of `dtype` take, or the error saying why they cannot be stored.
pub(crate) fn bytes_for(dtype: GgmlType, values: usize) -> Result<usize, KernelError> {
    dtype.bytes_for(values).ok_or(KernelError::NotWholeBlocks {
        dtype,
        values,
        block_size: dtype.block_size(),
    })
}

/// Checks that `bytes` holds exactly `values` elements of `dtype`.
pub(crate) fn check_len(dtype: GgmlType, values: usize, bytes: usize) -> Result<(), KernelError> {
    let expected = bytes_for(dtype, values)?;
    if expected != bytes {
        return Err(KernelError::ByteLength {
            dtype,
            values,
            expected,
            actual: bytes,
        });
    }
    Ok(())
}
