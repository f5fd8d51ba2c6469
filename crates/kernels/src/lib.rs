//! gemma-kernels: the compute layer. Dequantization, activation quantization and dot products for
//! every `GgmlType` (a scalar reference plus SIMD variants chosen once at run time), matrix
//! multiplication over quantized weights, and the persistent worker pool that runs it.
//!
//! This crate is the only place with `unsafe` SIMD code; every public function checks the sizes
//! the SIMD code relies on before calling it.

#[cfg(target_endian = "big")]
compile_error!(
    "gemma-kernels reads GGML data as little-endian and supports little-endian targets only"
);

pub mod conv;
mod error;
pub mod gemm;
pub mod matmul;
pub mod membench;
pub mod ops;
pub mod pool;
pub mod quant;
pub mod sparse;

pub use error::KernelError;
pub use gemma_formats::GgmlType;
pub use matmul::{
    dequantize_row, interleaving_pays, matmul, matmul_rows, matmul_shared_input, matmul_with,
    RowLayout, WeightMatrix,
};
pub use pool::ThreadPool;
pub use quant::Isa;
