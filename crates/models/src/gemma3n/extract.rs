//! `gemma extract`: a MatFormer sub-model of a Gemma 3n GGUF as a smaller standalone GGUF,
//! optionally with the per-layer embedding (PLE) table requantized.

use gemma_formats::{GgmlType, GgufFile, GgufWriter, MetaValue};
use gemma_kernels::quant;

use super::{Gemma3nConfig, MatformerConfig};
use crate::ModelError;

/// What to change while copying.
#[derive(Clone, Debug, Default)]
pub struct ExtractOptions {
    /// Cut every layer's MLP to these widths; `None` keeps them.
    pub matformer: Option<MatformerConfig>,
    /// Store `per_layer_token_embd.weight` in this type (Q8_0, Q4_0, ...); `None` keeps it.
    pub ple_type: Option<GgmlType>,
}

const PLE_TENSOR: &str = "per_layer_token_embd.weight";
/// PLE rows converted per step: bounds the f32 staging buffer for tables of billions of values.
const PLE_ROWS_PER_STEP: usize = 1024;

/// Builds the extracted file in memory (every tensor's bytes; the caller writes it). Tensors
/// other than the MLPs and the PLE table, vision/audio towers included, are copied unchanged.
pub fn extract_gguf(src: &GgufFile, opts: &ExtractOptions) -> Result<GgufWriter, ModelError> {
    let config = Gemma3nConfig::from_gguf(src)?;
    let arch = src.architecture()?.to_string();
    let stored = config.intermediate_size.clone();
    let widths = match &opts.matformer {
        Some(m) => m.widths(&stored)?,
        None => stored.clone(),
    };
    let ffn_key = format!("{arch}.feed_forward_length");
    let write_err = |e: gemma_formats::GgufWriteError| ModelError::Config(e.to_string());

    let mut out = GgufWriter::new();
    for (key, value) in src.metadata() {
        if key == "general.alignment" {
            continue;
        }
        let value = if *key == ffn_key {
            MetaValue::Array(widths.iter().map(|&w| MetaValue::U32(w as u32)).collect())
        } else {
            value.clone()
        };
        out.add_metadata(key.clone(), value).map_err(write_err)?;
    }
    out.set_alignment(src.alignment()).map_err(write_err)?;

    for info in src.tensors() {
        let data = src.tensor_data(info);
        let bytes = data.bytes();
        let (dtype, shape, new) = match mlp_part(&info.name) {
            Some((layer, part)) if layer < widths.len() && widths[layer] != stored[layer] => {
                let w = widths[layer];
                match part {
                    MlpPart::GateOrUp => {
                        let [rows, cols] = matrix_shape(info)?;
                        if rows != stored[layer] {
                            return Err(shape_err(info, vec![stored[layer], cols]));
                        }
                        let len = bytes.len() / rows * w;
                        (info.dtype, vec![w, cols], bytes[..len].to_vec())
                    }
                    MlpPart::Down => {
                        let [rows, cols] = matrix_shape(info)?;
                        if cols != stored[layer] {
                            return Err(shape_err(info, vec![rows, stored[layer]]));
                        }
                        let keep = match info.dtype.bytes_for(w) {
                            Some(b) if w.is_multiple_of(info.dtype.block_size()) => b,
                            _ => {
                                return Err(ModelError::TensorType {
                                    name: format!("{} (cut to {w} columns)", info.name),
                                    dtype: info.dtype,
                                })
                            }
                        };
                        let row = bytes.len() / rows;
                        let cut = bytes
                            .chunks_exact(row)
                            .flat_map(|r| &r[..keep])
                            .copied()
                            .collect();
                        (info.dtype, vec![rows, w], cut)
                    }
                }
            }
            _ if info.name == PLE_TENSOR => match opts.ple_type {
                Some(t) if t != info.dtype => {
                    let [rows, cols] = matrix_shape(info)?;
                    (t, vec![rows, cols], requantize(info, bytes, t, cols)?)
                }
                _ => (info.dtype, info.shape.clone(), bytes.to_vec()),
            },
            _ => (info.dtype, info.shape.clone(), bytes.to_vec()),
        };
        out.add_tensor(info.name.clone(), dtype, &shape, new)
            .map_err(write_err)?;
    }
    Ok(out)
}

enum MlpPart {
    GateOrUp,
    Down,
}

/// `blk.N.ffn_{gate,up,down}.weight` → (N, part).
fn mlp_part(name: &str) -> Option<(usize, MlpPart)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let part = match tail {
        "ffn_gate.weight" | "ffn_up.weight" => MlpPart::GateOrUp,
        "ffn_down.weight" => MlpPart::Down,
        _ => return None,
    };
    Some((layer.parse().ok()?, part))
}

fn matrix_shape(info: &gemma_formats::GgufTensorInfo) -> Result<[usize; 2], ModelError> {
    match info.shape[..] {
        [rows, cols] if rows > 0 => Ok([rows, cols]),
        _ => Err(ModelError::TensorShape {
            name: info.name.clone(),
            found: info.shape.clone(),
            expected: vec![0, 0],
        }),
    }
}

fn shape_err(info: &gemma_formats::GgufTensorInfo, expected: Vec<usize>) -> ModelError {
    ModelError::TensorShape {
        name: info.name.clone(),
        found: info.shape.clone(),
        expected,
    }
}

/// The PLE table converted to `to`, a block of rows at a time.
fn requantize(
    info: &gemma_formats::GgufTensorInfo,
    bytes: &[u8],
    to: GgmlType,
    cols: usize,
) -> Result<Vec<u8>, ModelError> {
    let type_err = |dtype| ModelError::TensorType {
        name: info.name.clone(),
        dtype,
    };
    let (Some(src_row), Some(dst_row)) = (info.dtype.bytes_for(cols), to.bytes_for(cols)) else {
        return Err(type_err(to));
    };
    if !cols.is_multiple_of(to.block_size()) || !cols.is_multiple_of(info.dtype.block_size()) {
        return Err(type_err(to));
    }
    let rows = bytes.len() / src_row;
    let mut out = vec![0u8; rows * dst_row];
    let mut staging = vec![0.0f32; PLE_ROWS_PER_STEP * cols];
    for (src, dst) in bytes
        .chunks(PLE_ROWS_PER_STEP * src_row)
        .zip(out.chunks_mut(PLE_ROWS_PER_STEP * dst_row))
    {
        let values = &mut staging[..src.len() / src_row * cols];
        quant::dequantize(info.dtype, src, values).map_err(|_| type_err(info.dtype))?;
        quant::quantize(to, values, dst).map_err(|_| type_err(to))?;
    }
    Ok(out)
}
