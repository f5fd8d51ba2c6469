//! Typed access to checkpoint tensors: shape and type checks at the boundary, so the forward
//! pass can trust what it holds.

use gemma_formats::{Blob, GgmlType, TensorData, TensorSource};
use gemma_kernels::matmul::{self, RowLayout, WeightMatrix};
use gemma_kernels::pool::ThreadPool;
use gemma_kernels::quant::{self, interleave};

use crate::ModelError;

/// A `[rows, cols]` weight kept in its stored type, read in place from the file mapping (or
/// the file's resident copy), row-major or interleaved for decoding as the file hands it out
/// (see `GgufFile::interleave_tensors`).
#[derive(Clone, Debug)]
pub struct Linear {
    pub dtype: GgmlType,
    pub rows: usize,
    pub cols: usize,
    data: Blob,
    layout: RowLayout,
}

impl Linear {
    pub fn matrix(&self) -> WeightMatrix<'_> {
        WeightMatrix {
            dtype: self.dtype,
            rows: self.rows,
            cols: self.cols,
            data: self.data.bytes(),
            layout: self.layout,
        }
    }

    /// A row-major matrix over `data`.
    fn row_major(dtype: GgmlType, rows: usize, cols: usize, data: Blob) -> Linear {
        Linear {
            dtype,
            rows,
            cols,
            data,
            layout: RowLayout::RowMajor,
        }
    }

    /// This matrix with its rows in row-major order: itself, or a copy of an interleaved one.
    fn to_row_major(&self) -> Linear {
        if self.layout == RowLayout::RowMajor {
            return self.clone();
        }
        let m = self.matrix();
        let row_bytes = m.row_bytes();
        let mut bytes = vec![0u8; self.data.len()];
        for (r, dst) in bytes.chunks_exact_mut(row_bytes.max(1)).enumerate() {
            gemma_kernels::quant::interleave::row_of(self.dtype, m.data, self.cols, r, dst);
        }
        Linear::row_major(self.dtype, self.rows, self.cols, Blob::from_vec(bytes))
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Drops the pages of a memory-mapped matrix from the resident set (they are read again
    /// from the file if touched); nothing for a matrix held in memory.
    pub fn release(&self) {
        self.data.release(0, self.data.len());
    }

    /// Drops row `r`'s pages of a memory-mapped matrix from the resident set once read (see
    /// `Blob::release`); nothing for a matrix held in memory.
    pub fn release_row(&self, r: usize) {
        if self.layout == RowLayout::RowMajor && r < self.rows {
            let row_bytes = self.data.len() / self.rows;
            self.data.release(r * row_bytes, row_bytes);
        }
    }
}

/// How tensors are named and stored in a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// llama.cpp names (`blk.N.attn_q.weight`); Gemma norms already hold `1 + w`.
    Gguf,
    /// transformers names (`model.layers.N.self_attn.q_proj.weight`) under `prefix`; norms hold `w`.
    HuggingFace { prefix: &'static str },
}

/// Fetches and checks tensors from a source.
pub struct Loader<'a> {
    pub source: &'a dyn TensorSource,
    pub layout: WeightLayout,
}

impl Loader<'_> {
    fn get(&self, name: &str) -> Result<TensorData, ModelError> {
        self.source
            .tensor(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    /// A matrix of shape `[rows, cols]` (outermost first). Any stored type our kernels support.
    #[track_caller]
    pub fn linear(&self, name: &str, rows: usize, cols: usize) -> Result<Linear, ModelError> {
        self.linear_view(name, &[rows, cols])
    }

    /// A tensor of shape `shape` (outermost first) viewed as the matrix
    /// `[shape[0], product of the rest]`: a convolution weight `[out, in, kh, kw]` is the matrix
    /// that multiplies patches flattened in `(in, kh, kw)` order. No copy.
    #[track_caller]
    pub fn linear_view(&self, name: &str, shape: &[usize]) -> Result<Linear, ModelError> {
        let t = self.get(name)?;
        let rows = shape.first().copied().unwrap_or(0);
        let cols = shape
            .iter()
            .skip(1)
            .try_fold(1usize, |a, &d| a.checked_mul(d));
        let cols = match cols {
            Some(cols) if t.shape == shape && rows.checked_mul(cols).is_some() => cols,
            _ => {
                return Err(ModelError::TensorShape {
                    name: name.into(),
                    found: t.shape,
                    expected: shape.to_vec(),
                })
            }
        };
        let layout = if t.interleaved {
            RowLayout::Interleaved
        } else {
            RowLayout::RowMajor
        };
        let w = WeightMatrix {
            dtype: t.dtype,
            rows,
            cols,
            data: &t.data,
            layout,
        };
        // Interleaved tensors are 2-D matrices of whole row groups, viewed as themselves.
        if !cols.is_multiple_of(t.dtype.block_size())
            || t.dtype.bytes_for(rows * cols) != Some(t.data.len())
            || (t.interleaved && (shape.len() != 2 || w.validate().is_err()))
        {
            return Err(ModelError::TensorType {
                name: name.into(),
                dtype: t.dtype,
            });
        }
        Ok(Linear {
            dtype: t.dtype,
            rows,
            cols,
            data: t.data,
            layout,
        })
    }

    /// A raw parameter used as `x @ W`, stored `[cols, rows]` (in, out), as the `[rows, cols]`
    /// (out, in) matrix the kernels multiply by: transposed here, once, into an owned copy (the
    /// one tensor loading reads; Gemma 3's projector weight, 1152 × text hidden). Plain element
    /// types (f32, f16, bf16) keep their type; block-quantized ones are dequantized to f32,
    /// since their blocks run along the stored rows, the wrong axis after the transpose.
    pub fn linear_transposed(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Linear, ModelError> {
        let t = self.get(name)?;
        if t.shape != [cols, rows] {
            return Err(ModelError::TensorShape {
                name: name.into(),
                found: t.shape,
                expected: vec![cols, rows],
            });
        }
        let type_error = || ModelError::TensorType {
            name: name.into(),
            dtype: t.dtype,
        };
        let n = rows.checked_mul(cols).ok_or_else(type_error)?;
        if t.dtype.bytes_for(n) != Some(t.data.len()) || t.interleaved {
            return Err(type_error());
        }
        let (dtype, bytes) = if t.dtype.block_size() == 1 {
            // Element `(r, c)` of the result is stored element `(c, r)`, `size` bytes each.
            let size = t.dtype.type_size();
            let src = t.data.bytes();
            let mut out = vec![0u8; src.len()];
            for (r, dst_row) in out.chunks_exact_mut(cols * size).enumerate() {
                for (c, dst) in dst_row.chunks_exact_mut(size).enumerate() {
                    let at = (c * rows + r) * size;
                    dst.copy_from_slice(&src[at..at + size]);
                }
            }
            (t.dtype, out)
        } else {
            if !rows.is_multiple_of(t.dtype.block_size()) {
                return Err(type_error());
            }
            let mut stored = vec![0.0f32; n];
            quant::dequantize(t.dtype, &t.data, &mut stored).map_err(|_| type_error())?;
            let mut out = Vec::with_capacity(4 * n);
            for r in 0..rows {
                for c in 0..cols {
                    out.extend_from_slice(&stored[c * rows + r].to_le_bytes());
                }
            }
            (GgmlType::F32, out)
        };
        Ok(Linear::row_major(dtype, rows, cols, Blob::from_vec(bytes)))
    }

    /// A vector of `len` values, converted to f32.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let t = self.get(name)?;
        if t.shape != [len] {
            return Err(ModelError::TensorShape {
                name: name.into(),
                found: t.shape,
                expected: vec![len],
            });
        }
        let mut out = vec![0.0; len];
        quant::dequantize(t.dtype, &t.data, &mut out).map_err(|_| ModelError::TensorType {
            name: name.into(),
            dtype: t.dtype,
        })?;
        Ok(out)
    }

    /// A Gemma RMSNorm weight as the multiplier the kernel applies: `1 + w`. GGUF files from
    /// llama.cpp store `1 + w` already; transformers checkpoints store `w`.
    pub fn gemma_norm(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let mut w = self.vector(name, len)?;
        if matches!(self.layout, WeightLayout::HuggingFace { .. }) {
            w.iter_mut().for_each(|v| *v += 1.0);
        }
        Ok(w)
    }
}

/// A byte range of a blob, as the owner of a zero-copy sub-blob.
struct BlobRange {
    blob: Blob,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for BlobRange {
    fn as_ref(&self) -> &[u8] {
        &self.blob.bytes()[self.start..self.start + self.len]
    }
}

fn sub_blob(blob: &Blob, start: usize, len: usize) -> Blob {
    let range = BlobRange {
        blob: blob.clone(),
        start,
        len,
    };
    Blob::new(std::sync::Arc::new(range), 0, len)
}

impl Loader<'_> {
    /// A `[count, rows, cols]` tensor as `count` matrices of `[rows, cols]` (llama.cpp stacks
    /// some per-stream projections this way), each a view of the stored bytes.
    pub fn stacked_linears(
        &self,
        name: &str,
        count: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<Linear>, ModelError> {
        let t = self.get(name)?;
        if t.shape != [count, rows, cols] {
            return Err(ModelError::TensorShape {
                name: name.into(),
                found: t.shape,
                expected: vec![count, rows, cols],
            });
        }
        let each = match t.dtype.bytes_for(rows * cols) {
            Some(b)
                if cols.is_multiple_of(t.dtype.block_size())
                    && b * count == t.data.len()
                    && !t.interleaved =>
            {
                b
            }
            _ => {
                return Err(ModelError::TensorType {
                    name: name.into(),
                    dtype: t.dtype,
                })
            }
        };
        Ok((0..count)
            .map(|i| Linear::row_major(t.dtype, rows, cols, sub_blob(&t.data, i * each, each)))
            .collect())
    }
}

impl Linear {
    /// The first `rows` rows (MatFormer slicing of gate/up projections): rows (or interleaved
    /// groups of eight rows) are contiguous, so this is a view of the same bytes; an
    /// interleaved matrix cut inside a group is copied back to row-major order first.
    pub fn first_rows(&self, name: &str, rows: usize) -> Result<Linear, ModelError> {
        if self.layout == RowLayout::Interleaved && !rows.is_multiple_of(interleave::GROUP_ROWS) {
            return self.to_row_major().first_rows(name, rows);
        }
        if rows > self.rows {
            return Err(ModelError::TensorShape {
                name: name.into(),
                found: vec![self.rows, self.cols],
                expected: vec![rows, self.cols],
            });
        }
        let len = self.data.len() / self.rows.max(1) * rows;
        Ok(Linear {
            dtype: self.dtype,
            rows,
            cols: self.cols,
            data: sub_blob(&self.data, 0, len),
            layout: if rows == 0 {
                RowLayout::RowMajor
            } else {
                self.layout
            },
        })
    }

    /// The first `cols` columns of every row (MatFormer slicing of down projections). The
    /// kernels take contiguous rows, so the kept prefix of each row is copied once into an owned
    /// buffer, still in the stored type; `cols` must be a whole number of the type's blocks.
    pub fn first_cols(&self, name: &str, cols: usize) -> Result<Linear, ModelError> {
        if cols > self.cols {
            return Err(ModelError::TensorShape {
                name: name.into(),
                found: vec![self.rows, self.cols],
                expected: vec![self.rows, cols],
            });
        }
        let prefix = match self.dtype.bytes_for(cols) {
            Some(b) if cols.is_multiple_of(self.dtype.block_size()) => b,
            _ => {
                return Err(ModelError::TensorType {
                    name: format!("{name} (cut to {cols} columns)"),
                    dtype: self.dtype,
                })
            }
        };
        // A row's first blocks, or in an interleaved matrix each group's first blocks (a group
        // stores block after block, eight rows each): the same cut either way.
        let (unit, kept) = match self.layout {
            RowLayout::RowMajor => (1, prefix),
            RowLayout::Interleaved => (interleave::GROUP_ROWS, interleave::GROUP_ROWS * prefix),
        };
        let unit_bytes = self.data.len() / self.rows.max(1) * unit;
        let bytes: Vec<u8> = self
            .data
            .bytes()
            .chunks_exact(unit_bytes.max(1))
            .flat_map(|row| &row[..kept])
            .copied()
            .collect();
        Ok(Linear {
            dtype: self.dtype,
            rows: self.rows,
            cols,
            data: Blob::from_vec(bytes),
            layout: self.layout,
        })
    }
}

impl Linear {
    /// The same matrix stored as `dtype` (dequantized and requantized row by row with ggml's
    /// reference quantizers into an owned buffer): a tower kept at bf16 in its checkpoint can
    /// run on int8 dot products. A matrix already of `dtype`, or whose rows are not whole
    /// blocks of it, is returned as it is.
    pub fn requantized(&self, dtype: GgmlType) -> Linear {
        if self.dtype == dtype || !self.cols.is_multiple_of(dtype.block_size()) {
            return self.clone();
        }
        let Some(row_bytes) = dtype.bytes_for(self.cols) else {
            return self.clone();
        };
        let m = self.matrix();
        let mut row = vec![0.0f32; self.cols];
        let mut out = vec![0u8; row_bytes * self.rows];
        for (r, dst) in out.chunks_exact_mut(row_bytes).enumerate() {
            matmul::dequantize_row(&m, r, &mut row);
            if quant::quantize(dtype, &row, dst).is_err() {
                return self.clone();
            }
        }
        Linear::row_major(dtype, self.rows, self.cols, Blob::from_vec(out))
    }
}

/// `y = x · Wᵀ` for `n_tokens` rows of `x`.
pub(crate) fn linear(
    pool: &ThreadPool,
    w: &Linear,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    scratch: &mut Vec<u8>,
) {
    let m: WeightMatrix<'_> = w.matrix();
    matmul::matmul(pool, &m, x, n_tokens, y, scratch);
}

/// [`linear`] of several weights on the same input (q/k/v, gate/up), as one pool job.
pub(crate) fn linear_shared_input<const N: usize>(
    pool: &ThreadPool,
    ws: [&Linear; N],
    x: &[f32],
    n_tokens: usize,
    mut ys: [&mut [f32]; N],
    scratch: &mut Vec<u8>,
) {
    let ms: [WeightMatrix<'_>; N] = ws.map(Linear::matrix);
    matmul::matmul_shared_input(pool, &ms, x, n_tokens, &mut ys, scratch);
}

/// Stores the decoder's weight matrices of `gguf` interleaved for the decode kernels (see
/// [`gemma_kernels::quant::interleave`]; only where they gain: Q4_0 and Q8_0 matrices of whole
/// row groups, on CPUs with the kernels), before a model is loaded from it. Returns the bytes
/// rewritten. Layer tensors (`blk.*`), the output matrix and Gemma 3n's projection into the
/// per-layer inputs are chosen, and the token
/// embedding when it is also the output matrix (read whole every token); never a table read by
/// rows only (Gemma 3n's per-layer embeddings), nor a tower's tensors. `GEMMA_INTERLEAVE=0`
/// keeps every tensor as stored (for comparisons).
pub fn interleave_decoder_weights(gguf: &mut gemma_formats::GgufFile) -> Result<usize, ModelError> {
    if std::env::var("GEMMA_INTERLEAVE").is_ok_and(|v| v == "0") {
        return Ok(0);
    }
    let tied = gguf.tensor_info("output.weight").is_none();
    // Gemma 3n's sparse MLPs read their up projection by rows and keep a transposed copy of
    // their down projection (see `crate::gemma3n`): both stay row-major and untouched.
    let sparse_mlps: Vec<String> = crate::gemma3n::sparse_mlp_layers(gguf)
        .into_iter()
        .flat_map(|i| {
            [
                format!("blk.{i}.ffn_up.weight"),
                format!("blk.{i}.ffn_down.weight"),
            ]
        })
        .collect();
    let choose = |info: &gemma_formats::GgufTensorInfo| {
        if sparse_mlps.contains(&info.name) {
            return false;
        }
        let decoder = info.name.starts_with("blk.")
            || info.name == "output.weight"
            || info.name == "per_layer_model_proj.weight"
            || (tied && info.name == "token_embd.weight");
        match info.shape[..] {
            [rows, cols] => decoder && matmul::interleaving_pays(info.dtype, rows, cols),
            _ => false,
        }
    };
    let rewrite = |info: &gemma_formats::GgufTensorInfo, bytes: &mut [u8]| {
        interleave::interleave_in_place(info.dtype, bytes, info.shape[1], &mut Vec::new());
    };
    Ok(gguf.interleave_tensors(&choose, &rewrite)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MatFormer's cuts of an interleaved matrix (whole groups, inside a group, and columns)
    /// hold the same rows as the cuts of the row-major matrix.
    #[test]
    fn cuts_of_an_interleaved_matrix_hold_the_row_major_cuts_rows() {
        let (rows, cols) = (32, 128);
        let dtype = GgmlType::Q8_0;
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37) % 101) as f32 - 50.0)
            .collect();
        let mut bytes = vec![0u8; dtype.bytes_for(rows * cols).unwrap()];
        quant::quantize(dtype, &x, &mut bytes).unwrap();
        let plain = Linear::row_major(dtype, rows, cols, Blob::from_vec(bytes.clone()));
        interleave::interleave_in_place(dtype, &mut bytes, cols, &mut Vec::new());
        let packed = Linear {
            layout: RowLayout::Interleaved,
            ..Linear::row_major(dtype, rows, cols, Blob::from_vec(bytes))
        };
        let dense = |w: &Linear| {
            let m = w.matrix();
            m.validate().unwrap();
            let mut out = vec![0.0; w.rows * w.cols];
            for (r, row) in out.chunks_exact_mut(w.cols).enumerate() {
                matmul::dequantize_row(&m, r, row);
            }
            out
        };
        assert_eq!(dense(&packed), dense(&plain));
        for n in [16, 13] {
            let cut = packed.first_rows("w", n).unwrap();
            assert_eq!(cut.layout == RowLayout::Interleaved, n % 8 == 0);
            assert_eq!(
                dense(&cut),
                dense(&plain.first_rows("w", n).unwrap()),
                "{n} rows"
            );
        }
        let cut = packed.first_cols("w", 64).unwrap();
        assert_eq!(cut.layout, RowLayout::Interleaved);
        assert_eq!(dense(&cut), dense(&plain.first_cols("w", 64).unwrap()));
        assert_eq!(dense(&packed.to_row_major()), dense(&plain));
    }
}
