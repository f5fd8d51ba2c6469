//! `gemma extract`: a MatFormer sub-model of a Gemma 3n GGUF (narrower MLPs, skipped layers)
//! as a smaller standalone GGUF, optionally with the per-layer embedding (PLE) table
//! requantized.

use gemma_formats::{GgmlType, GgufFile, GgufWriter, MetaValue};
use gemma_kernels::quant;

use super::{Gemma3nConfig, MatformerConfig, SubModel};
use crate::ModelError;

/// What to change while copying.
#[derive(Clone, Debug, Default)]
pub struct ExtractOptions {
    /// The sub-model to write (layers kept, MLP widths); `None` keeps the model whole.
    pub matformer: Option<MatformerConfig>,
    /// Store `per_layer_token_embd.weight` in this type (Q8_0, Q4_0, ...); `None` keeps it.
    pub ple_type: Option<GgmlType>,
}

const PLE_TENSOR: &str = "per_layer_token_embd.weight";
const PLE_PROJECTION: &str = "per_layer_model_proj.weight";
/// PLE rows converted per step: bounds the f32 staging buffer for tables of billions of values.
const PLE_ROWS_PER_STEP: usize = 1024;

/// Builds the extracted file in memory (every tensor's bytes; the caller writes it). Skipped
/// layers' tensors are left out and the kept `blk.N.*` renumbered; the PLE table keeps the
/// kept layers' column blocks and `per_layer_model_proj` their row blocks; the MLPs are cut to
/// the configured widths; per-layer metadata arrays are filtered and the layer and KV-shared
/// counts rewritten. Everything else, vision/audio towers included, is copied unchanged.
pub fn extract_gguf(src: &GgufFile, opts: &ExtractOptions) -> Result<GgufWriter, ModelError> {
    let config = Gemma3nConfig::from_gguf(src)?;
    let arch = src.architecture()?.to_string();
    let stored = config.intermediate_size.clone();
    let n_layers = config.num_hidden_layers;
    let sub = match &opts.matformer {
        Some(m) => m.plan(&config, &stored)?,
        None => SubModel {
            kept: (0..n_layers).collect(),
            config: config.clone(),
        },
    };
    let kept = &sub.kept;
    let widths = &sub.config.intermediate_size;
    let skipping = kept.len() != n_layers;
    let per_layer_width = config.hidden_size_per_layer_input;
    let write_err = |e: gemma_formats::GgufWriteError| ModelError::Config(e.to_string());

    let mut out = GgufWriter::new();
    for (key, value) in src.metadata() {
        if key == "general.alignment" {
            continue;
        }
        let value = match key.strip_prefix(&arch).and_then(|k| k.strip_prefix('.')) {
            Some("feed_forward_length") => {
                MetaValue::Array(widths.iter().map(|&w| MetaValue::U32(w as u32)).collect())
            }
            Some("block_count") => same_int_type(value, kept.len()),
            Some("attention.shared_kv_layers") => {
                same_int_type(value, sub.config.num_kv_shared_layers)
            }
            // llama.cpp's per-layer arrays (attention types, sparsity, ...): the kept entries.
            Some(_) if skipping => match value {
                MetaValue::Array(items) if items.len() == n_layers => {
                    MetaValue::Array(kept.iter().map(|&i| items[i].clone()).collect())
                }
                other => other.clone(),
            },
            _ => value.clone(),
        };
        out.add_metadata(key.clone(), value).map_err(write_err)?;
    }
    out.set_alignment(src.alignment()).map_err(write_err)?;

    for info in src.tensors() {
        let data = src.tensor_data(info);
        let bytes = data.bytes();
        if let Some((layer, tail)) = block_tensor(&info.name) {
            let Ok(j) = kept.binary_search(&layer) else {
                continue; // a skipped layer
            };
            let name = format!("blk.{j}.{tail}");
            let (shape, new) = cut_mlp(info, bytes, tail, stored[layer], widths[j])?;
            out.add_tensor(name, info.dtype, &shape, new)
                .map_err(write_err)?;
            continue;
        }
        let (dtype, shape, new) = match info.name.as_str() {
            PLE_TENSOR => {
                let [rows, cols] = matrix_shape(info)?;
                let (cols, sliced) = if skipping {
                    let cols_kept = kept.len() * per_layer_width;
                    let block = layer_block_bytes(info, per_layer_width, n_layers, cols)?;
                    let row = bytes.len() / rows;
                    let cut = bytes
                        .chunks_exact(row)
                        .flat_map(|r| kept.iter().flat_map(move |&i| &r[i * block..][..block]))
                        .copied()
                        .collect();
                    (cols_kept, cut)
                } else {
                    (cols, bytes.to_vec())
                };
                match opts.ple_type {
                    Some(t) if t != info.dtype => {
                        let q = requantize(&info.name, info.dtype, &sliced, t, cols)?;
                        (t, vec![rows, cols], q)
                    }
                    _ => (info.dtype, vec![rows, cols], sliced),
                }
            }
            PLE_PROJECTION if skipping => {
                let [rows, cols] = matrix_shape(info)?;
                if rows != n_layers * per_layer_width {
                    return Err(shape_err(info, vec![n_layers * per_layer_width, cols]));
                }
                let block = bytes.len() / n_layers;
                let cut = kept
                    .iter()
                    .flat_map(|&i| &bytes[i * block..][..block])
                    .copied()
                    .collect();
                (info.dtype, vec![kept.len() * per_layer_width, cols], cut)
            }
            _ => (info.dtype, info.shape.clone(), bytes.to_vec()),
        };
        out.add_tensor(info.name.clone(), dtype, &shape, new)
            .map_err(write_err)?;
    }
    Ok(out)
}

/// `value` rewritten to `n`, in the integer type the source file used.
fn same_int_type(value: &MetaValue, n: usize) -> MetaValue {
    match value {
        MetaValue::U64(_) => MetaValue::U64(n as u64),
        MetaValue::I64(_) => MetaValue::I64(n as i64),
        MetaValue::I32(_) => MetaValue::I32(n as i32),
        _ => MetaValue::U32(n as u32),
    }
}

/// Bytes of one layer's `P` columns in a PLE row; the layer blocks must be whole quant blocks.
fn layer_block_bytes(
    info: &gemma_formats::GgufTensorInfo,
    per_layer: usize,
    n_layers: usize,
    cols: usize,
) -> Result<usize, ModelError> {
    if cols != n_layers * per_layer {
        return Err(shape_err(info, vec![info.shape[0], n_layers * per_layer]));
    }
    info.dtype
        .bytes_for(per_layer)
        .ok_or_else(|| ModelError::TensorType {
            name: format!("{} (cut into per-layer blocks of {per_layer})", info.name),
            dtype: info.dtype,
        })
}

/// The tensor of one kept layer: MLP matrices cut to `width` units, anything else unchanged.
fn cut_mlp(
    info: &gemma_formats::GgufTensorInfo,
    bytes: &[u8],
    tail: &str,
    stored: usize,
    width: usize,
) -> Result<(Vec<usize>, Vec<u8>), ModelError> {
    let part = match tail {
        "ffn_gate.weight" | "ffn_up.weight" => MlpPart::GateOrUp,
        "ffn_down.weight" => MlpPart::Down,
        _ => return Ok((info.shape.clone(), bytes.to_vec())),
    };
    if width == stored {
        return Ok((info.shape.clone(), bytes.to_vec()));
    }
    let [rows, cols] = matrix_shape(info)?;
    match part {
        MlpPart::GateOrUp => {
            if rows != stored {
                return Err(shape_err(info, vec![stored, cols]));
            }
            let len = bytes.len() / rows * width;
            Ok((vec![width, cols], bytes[..len].to_vec()))
        }
        MlpPart::Down => {
            if cols != stored {
                return Err(shape_err(info, vec![rows, stored]));
            }
            let keep = match info.dtype.bytes_for(width) {
                Some(b) => b,
                None => {
                    return Err(ModelError::TensorType {
                        name: format!("{} (cut to {width} columns)", info.name),
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
            Ok((vec![rows, width], cut))
        }
    }
}

enum MlpPart {
    GateOrUp,
    Down,
}

/// `blk.N.rest` → (N, rest). Tower tensors (`v.blk.*`, `a.blk.*`) do not match.
fn block_tensor(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    Some((layer.parse().ok()?, tail))
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
    name: &str,
    from: GgmlType,
    bytes: &[u8],
    to: GgmlType,
    cols: usize,
) -> Result<Vec<u8>, ModelError> {
    let type_err = |dtype| ModelError::TensorType {
        name: name.to_string(),
        dtype,
    };
    let (Some(src_row), Some(dst_row)) = (from.bytes_for(cols), to.bytes_for(cols)) else {
        return Err(type_err(to));
    };
    let rows = bytes.len() / src_row;
    let mut out = vec![0u8; rows * dst_row];
    let mut staging = vec![0.0f32; PLE_ROWS_PER_STEP * cols];
    for (src, dst) in bytes
        .chunks(PLE_ROWS_PER_STEP * src_row)
        .zip(out.chunks_mut(PLE_ROWS_PER_STEP * dst_row))
    {
        let values = &mut staging[..src.len() / src_row * cols];
        quant::dequantize(from, src, values).map_err(|_| type_err(from))?;
        quant::quantize(to, values, dst).map_err(|_| type_err(to))?;
    }
    Ok(out)
}
