//! MobileNet-V5 (timm's `MobileNetV5Encoder`, `mobilenetv5_300m_enc`), Gemma 3n's vision tower.
//!
//! Activations are channel-last (`[height·width, channels]`, see `gemma_kernels::conv`), so
//! every 1×1 convolution (most of the FLOPs) is one GEMM over the image, and the output rows are
//! already the soft tokens' layout.
//!
//! Structure (timm's `_gen_mobilenet_v5` / `MobileNetV5Encoder.forward_features`):
//! - stem: 3×3 s2 conv with bias → RmsNorm2d → GELU-tanh;
//! - stages (`blocks.{s}.{i}`), each block one of
//!   - edge residual (`conv_exp` k×k + norm + GELU, `conv_pwl` 1×1 + norm),
//!   - universal inverted residual (optional depthwise `dw_start` + norm, `pw_exp` 1×1 + norm +
//!     GELU, optional depthwise `dw_mid` + norm + GELU, `pw_proj` 1×1 + norm),
//!   - mobile attention (RmsNorm2d, multi-query attention: `query` 1×1 to heads × key_dim; `key`
//!     and `value` each an optional depthwise `down_conv` + RmsNorm2d then a 1×1 to one shared
//!     head; softmax(q·kᵀ / √key_dim)·v; `output` 1×1),
//!
//!   then an optional `layer_scale` (per-channel γ) and the residual when the block keeps its
//!   shape;
//! - MSFA: the last two stages' outputs (the coarser nearest-upsampled to the finer), concatenated
//!   over channels → `pw_exp` 1×1 + norm + GELU → `pw_proj` 1×1 + norm (no residual) → average
//!   pool down to the output grid → RmsNorm2d.
//!
//! Every convolution pads TF-"SAME" (timm builds this model with `pad_type='same'`: stride-2
//! convolutions get `Conv2dSame`'s asymmetric padding, stride-1 ones `k // 2`). RmsNorm2d's eps
//! is timm's default 1e-6.
//!
//! Where each hyper-parameter comes from:
//! - block kinds: which tensors a block has (`conv_exp` → edge residual, `attn.query` →
//!   attention, `pw_exp` → UIR); stage and block counts: the `blocks.{s}.{i}` names present;
//! - channel widths, kernel sizes, head counts (query width / key width), key and value dims:
//!   the tensor shapes;
//! - strides, which names cannot say: timm's arch def for MobileNet-V5 opens every stage with a
//!   stride-2 block and has stride 1 elsewhere (in a UIR the stride sits on `dw_mid` when
//!   present, else on `dw_start`); an attention `down_conv` strides 2 (the `v2` of
//!   `mqa_…_v2_…`);
//! - the MSFA's inputs: the last two stages (`msfa_indices = (-2, -1)`), checked against the
//!   width of `msfa.ffn.pw_exp`; the output grid: the config's tokens per image (16×16 = 256).
//!
//! Pointwise and full convolution weights stay in the checkpoint's mapping and type (bf16 in
//! the published checkpoints) until a forward pass reads them; the small depthwise kernels and
//! norm weights are converted to f32 at load.

use gemma_formats::TensorData;
use gemma_kernels::conv::{self, ConvGeometry};
use gemma_kernels::ops::attention::{attention, AttentionMask, AttentionParams, KvSegment};
use gemma_kernels::pool::ThreadPool;
use gemma_kernels::quant;

use crate::kv_cache::sized;
use crate::weights::{linear, Linear, Loader};
use crate::ModelError;

/// timm's `RmsNorm2d` default epsilon.
pub const NORM_EPS: f32 = 1e-6;
/// Bounds far above the published tower, so a corrupt checkpoint is an error, not an attempt
/// to allocate terabytes.
const MAX_CHANNELS: usize = 1 << 15;
const MAX_KERNEL: usize = 15;
const MAX_STAGES: usize = 16;
const MAX_BLOCKS: usize = 1024;

fn shape_err(name: &str, found: Vec<usize>, expected: Vec<usize>) -> ModelError {
    ModelError::TensorShape {
        name: name.into(),
        found,
        expected,
    }
}

fn get(loader: &Loader, name: &str) -> Result<TensorData, ModelError> {
    loader
        .source
        .tensor(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
}

fn has(loader: &Loader, name: &str) -> bool {
    loader.source.tensor(name).is_some()
}

fn channels_ok(name: &str, shape: &[usize]) -> Result<(), ModelError> {
    if shape.iter().all(|&d| (1..=MAX_CHANNELS).contains(&d)) {
        Ok(())
    } else {
        Err(ModelError::Config(format!(
            "{name}: implausible shape {shape:?}"
        )))
    }
}

/// A convolution weight's shape `[out, in, kh, kw]`, checked to be 4-D with a square kernel.
fn conv_shape(loader: &Loader, name: &str) -> Result<[usize; 4], ModelError> {
    let t = get(loader, name)?;
    let s = t.shape.clone();
    match s[..] {
        [o, i, kh, kw] if kh == kw && kh <= MAX_KERNEL => {
            channels_ok(name, &s)?;
            Ok([o, i, kh, kw])
        }
        _ => Err(ModelError::Config(format!(
            "{name}: shape {s:?} is not a [out, in, k, k] convolution weight"
        ))),
    }
}

/// A tensor of exactly `shape`, converted to f32.
fn floats(loader: &Loader, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
    let t = get(loader, name)?;
    if t.shape != shape {
        return Err(shape_err(name, t.shape, shape.to_vec()));
    }
    let n: usize = shape.iter().product();
    let mut out = vec![0.0; n];
    quant::dequantize(t.dtype, &t.data, &mut out).map_err(|_| ModelError::TensorType {
        name: name.into(),
        dtype: t.dtype,
    })?;
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    None,
    Gelu,
}

enum ConvWeight {
    /// `[out, in·k·k]`; a 1×1 convolution when `kernel == 1` (a plain GEMM, no im2col).
    Full(Linear),
    /// Tap-major `[k·k, channels]`.
    Depthwise(Vec<f32>),
}

/// A convolution followed by RmsNorm2d and an optional GELU (timm's `ConvNormAct`).
struct ConvNorm {
    weight: ConvWeight,
    bias: Option<Vec<f32>>,
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    norm: Vec<f32>,
    act: Act,
}

impl ConvNorm {
    /// A full (or 1×1) convolution `conv_name` with `[out, in, k, k]` weight and norm `norm_name`.
    fn full(
        loader: &Loader,
        conv_name: &str,
        norm_name: &str,
        stride: usize,
        act: Act,
    ) -> Result<ConvNorm, ModelError> {
        let [o, i, k, _] = conv_shape(loader, conv_name)?;
        Ok(ConvNorm {
            weight: ConvWeight::Full(loader.linear_view(conv_name, &[o, i, k, k])?),
            bias: None,
            c_in: i,
            c_out: o,
            kernel: k,
            stride,
            norm: loader.vector(norm_name, o)?,
            act,
        })
    }

    /// A depthwise convolution (`[channels, 1, k, k]`).
    fn depthwise(
        loader: &Loader,
        conv_name: &str,
        norm_name: &str,
        stride: usize,
        act: Act,
    ) -> Result<ConvNorm, ModelError> {
        let [c, one, k, _] = conv_shape(loader, conv_name)?;
        if one != 1 {
            return Err(shape_err(conv_name, vec![c, one, k, k], vec![c, 1, k, k]));
        }
        let w = floats(loader, conv_name, &[c, 1, k, k])?;
        Ok(ConvNorm {
            weight: ConvWeight::Depthwise(conv::depthwise_taps(&w, c, k * k)),
            bias: None,
            c_in: c,
            c_out: c,
            kernel: k,
            stride,
            norm: loader.vector(norm_name, c)?,
            act,
        })
    }

    fn expect_in(&self, name: &str, c: usize) -> Result<(), ModelError> {
        if self.c_in == c {
            return Ok(());
        }
        Err(ModelError::Config(format!(
            "{name} takes {} channels but its input has {c}",
            self.c_in
        )))
    }

    fn bytes(&self) -> usize {
        let w = match &self.weight {
            ConvWeight::Full(l) => l.bytes(),
            ConvWeight::Depthwise(t) => 4 * t.len(),
        };
        w + 4 * (self.norm.len() + self.bias.as_ref().map_or(0, Vec::len))
    }

    /// Output side for an input side (square images).
    fn out_side(&self, side: usize) -> Option<usize> {
        ConvGeometry::same(side, side, self.kernel, self.kernel, self.stride).map(|g| g.out_h)
    }

    /// `x` (`[side², c_in]`) → `y` (`[out², c_out]`); returns the output side.
    fn forward(
        &self,
        pool: &ThreadPool,
        x: &[f32],
        side: usize,
        y: &mut Vec<f32>,
        s: &mut Scratch,
    ) -> usize {
        let g = ConvGeometry::same(side, side, self.kernel, self.kernel, self.stride)
            .expect("geometry checked at load");
        let y = sized(y, g.out_pixels() * self.c_out);
        match &self.weight {
            ConvWeight::Full(w) if self.kernel == 1 && self.stride == 1 => {
                linear(pool, w, x, g.out_pixels(), y, &mut s.quantized);
            }
            ConvWeight::Full(w) => {
                conv::conv2d(
                    pool,
                    &g,
                    self.c_in,
                    &w.matrix(),
                    x,
                    y,
                    &mut s.cols,
                    &mut s.quantized,
                );
            }
            ConvWeight::Depthwise(taps) => conv::depthwise_conv2d(pool, &g, self.c_in, x, taps, y),
        }
        conv::rms_norm_act_rows(
            pool,
            y,
            self.bias.as_deref(),
            &self.norm,
            NORM_EPS,
            self.act == Act::Gelu,
        );
        g.out_h
    }
}

/// `x = shortcut + γ·y` (or `x = γ·y`, `x = y`), in place into `y`.
fn finish(y: &mut [f32], gamma: Option<&[f32]>, shortcut: Option<&[f32]>) {
    if let Some(g) = gamma {
        for row in y.chunks_exact_mut(g.len()) {
            for (v, g) in row.iter_mut().zip(g) {
                *v *= g;
            }
        }
    }
    if let Some(s) = shortcut {
        for (v, s) in y.iter_mut().zip(s) {
            *v += s;
        }
    }
}

struct EdgeResidual {
    exp: ConvNorm,
    pwl: ConvNorm,
    layer_scale: Option<Vec<f32>>,
    skip: bool,
}

struct Uir {
    dw_start: Option<ConvNorm>,
    pw_exp: ConvNorm,
    dw_mid: Option<ConvNorm>,
    pw_proj: ConvNorm,
    layer_scale: Option<Vec<f32>>,
    skip: bool,
}

/// A key or value path: optional depthwise down-sampling + norm, then the 1×1 to one head.
struct KvPath {
    down: Option<ConvNorm>,
    proj: Linear,
}

struct MobileAttention {
    norm: Vec<f32>,
    query: Linear,
    key: KvPath,
    value: KvPath,
    output: Linear,
    heads: usize,
    key_dim: usize,
    channels: usize,
    layer_scale: Option<Vec<f32>>,
}

enum Block {
    Edge(EdgeResidual),
    Uir(Uir),
    Attention(MobileAttention),
}

impl Block {
    fn c_out(&self) -> usize {
        match self {
            Block::Edge(b) => b.pwl.c_out,
            Block::Uir(b) => b.pw_proj.c_out,
            Block::Attention(b) => b.channels,
        }
    }

    fn out_side(&self, side: usize) -> Option<usize> {
        match self {
            Block::Edge(b) => b.exp.out_side(side),
            Block::Uir(b) => {
                let side = match &b.dw_start {
                    Some(c) => c.out_side(side)?,
                    None => side,
                };
                match &b.dw_mid {
                    Some(c) => c.out_side(side),
                    None => Some(side),
                }
            }
            Block::Attention(b) => {
                // The K/V grid must not be empty.
                if let Some(d) = &b.key.down {
                    d.out_side(side)?;
                }
                Some(side)
            }
        }
    }

    fn bytes(&self) -> usize {
        let v = |o: &Option<Vec<f32>>| o.as_ref().map_or(0, |g| 4 * g.len());
        let c = |o: &Option<ConvNorm>| o.as_ref().map_or(0, ConvNorm::bytes);
        match self {
            Block::Edge(b) => b.exp.bytes() + b.pwl.bytes() + v(&b.layer_scale),
            Block::Uir(b) => {
                c(&b.dw_start)
                    + b.pw_exp.bytes()
                    + c(&b.dw_mid)
                    + b.pw_proj.bytes()
                    + v(&b.layer_scale)
            }
            Block::Attention(b) => {
                4 * b.norm.len()
                    + b.query.bytes()
                    + b.output.bytes()
                    + c(&b.key.down)
                    + c(&b.value.down)
                    + b.key.proj.bytes()
                    + b.value.proj.bytes()
                    + v(&b.layer_scale)
            }
        }
    }
}

/// Reusable buffers of one forward pass.
#[derive(Default)]
struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    cols: Vec<f32>,
    quantized: Vec<u8>,
}

/// The tower: stem, stages, MSFA.
pub struct MobileNetV5 {
    stem: ConvNorm,
    stages: Vec<Vec<Block>>,
    msfa_exp: ConvNorm,
    msfa_proj: ConvNorm,
    msfa_norm: Vec<f32>,
    /// Side of the square input (768).
    image_size: usize,
    /// Side of the output grid (16).
    output_side: usize,
    /// Sides of the last two stages' outputs.
    fine_side: usize,
    coarse_side: usize,
}

impl MobileNetV5 {
    /// Loads the tensors under `prefix` (`model.vision_tower.timm_model.`) for an input of
    /// `image_size`² pixels and an output grid of `output_side`².
    pub fn load(
        loader: &Loader,
        prefix: &str,
        image_size: usize,
        output_side: usize,
    ) -> Result<MobileNetV5, ModelError> {
        let n = |s: &str| format!("{prefix}{s}");
        let cfg_err = |m: String| ModelError::Config(m);
        let mut stem = ConvNorm::full(
            loader,
            &n("conv_stem.conv.weight"),
            &n("conv_stem.bn.weight"),
            2,
            Act::Gelu,
        )?;
        stem.expect_in(&n("conv_stem.conv.weight"), 3)?;
        if has(loader, &n("conv_stem.conv.bias")) {
            stem.bias = Some(loader.vector(&n("conv_stem.conv.bias"), stem.c_out)?);
        }
        let mut c = stem.c_out;
        let mut side = stem
            .out_side(image_size)
            .ok_or_else(|| cfg_err(format!("image size {image_size}")))?;
        let mut stages = Vec::new();
        let mut sides = Vec::new();
        for s in 0..MAX_STAGES {
            if !Self::block_exists(loader, prefix, s, 0) {
                break;
            }
            let mut blocks = Vec::new();
            for i in 0..MAX_BLOCKS {
                if !Self::block_exists(loader, prefix, s, i) {
                    break;
                }
                let stride = if i == 0 { 2 } else { 1 };
                let p = format!("{prefix}blocks.{s}.{i}.");
                let block = Self::load_block(loader, &p, c, stride)?;
                side = block
                    .out_side(side)
                    .ok_or_else(|| cfg_err(format!("{p}: the image is too small")))?;
                c = block.c_out();
                blocks.push(block);
            }
            stages.push(blocks);
            sides.push((side, c));
        }
        if stages.len() < 2 {
            return Err(ModelError::MissingTensor(n("blocks.1.0.*")));
        }
        let (fine_side, fine_c) = sides[sides.len() - 2];
        let (coarse_side, coarse_c) = sides[sides.len() - 1];
        let msfa_exp = ConvNorm::full(
            loader,
            &n("msfa.ffn.pw_exp.conv.weight"),
            &n("msfa.ffn.pw_exp.bn.weight"),
            1,
            Act::Gelu,
        )?;
        msfa_exp.expect_in(&n("msfa.ffn.pw_exp.conv.weight"), fine_c + coarse_c)?;
        let msfa_proj = ConvNorm::full(
            loader,
            &n("msfa.ffn.pw_proj.conv.weight"),
            &n("msfa.ffn.pw_proj.bn.weight"),
            1,
            Act::None,
        )?;
        msfa_proj.expect_in(&n("msfa.ffn.pw_proj.conv.weight"), msfa_exp.c_out)?;
        for m in [&msfa_exp, &msfa_proj] {
            if m.kernel != 1 {
                return Err(cfg_err("the MSFA's convolutions must be 1x1".into()));
            }
        }
        let msfa_norm = loader.vector(&n("msfa.norm.weight"), msfa_proj.c_out)?;
        if output_side == 0 || fine_side % output_side != 0 || coarse_side > fine_side {
            return Err(cfg_err(format!(
                "the MSFA pools a {fine_side}x{fine_side} grid to {output_side}x{output_side}: \
                 only whole-window average pooling is supported"
            )));
        }
        Ok(MobileNetV5 {
            stem,
            stages,
            msfa_exp,
            msfa_proj,
            msfa_norm,
            image_size,
            output_side,
            fine_side,
            coarse_side,
        })
    }

    fn block_exists(loader: &Loader, prefix: &str, s: usize, i: usize) -> bool {
        let p = format!("{prefix}blocks.{s}.{i}.");
        [
            "conv_exp.weight",
            "pw_exp.conv.weight",
            "attn.query.proj.weight",
        ]
        .iter()
        .any(|t| has(loader, &format!("{p}{t}")))
    }

    fn layer_scale(loader: &Loader, p: &str, c: usize) -> Result<Option<Vec<f32>>, ModelError> {
        let name = format!("{p}layer_scale.gamma");
        if has(loader, &name) {
            Ok(Some(loader.vector(&name, c)?))
        } else {
            Ok(None)
        }
    }

    fn load_block(
        loader: &Loader,
        p: &str,
        c_in: usize,
        stride: usize,
    ) -> Result<Block, ModelError> {
        let n = |s: &str| format!("{p}{s}");
        let unsupported = |what: &str| {
            Err(ModelError::Config(format!(
                "{p}: {what} is not supported (not in MobileNet-V5-300M)"
            )))
        };
        if has(loader, &n("conv_exp.weight")) {
            let exp = ConvNorm::full(
                loader,
                &n("conv_exp.weight"),
                &n("bn1.weight"),
                stride,
                Act::Gelu,
            )?;
            exp.expect_in(&n("conv_exp.weight"), c_in)?;
            let pwl = ConvNorm::full(
                loader,
                &n("conv_pwl.weight"),
                &n("bn2.weight"),
                1,
                Act::None,
            )?;
            pwl.expect_in(&n("conv_pwl.weight"), exp.c_out)?;
            if pwl.kernel != 1 {
                return unsupported("a k>1 conv_pwl");
            }
            if has(loader, &n("se.conv_reduce.weight")) {
                return unsupported("squeeze-excite");
            }
            let layer_scale = Self::layer_scale(loader, p, pwl.c_out)?;
            let skip = stride == 1 && pwl.c_out == c_in;
            return Ok(Block::Edge(EdgeResidual {
                exp,
                pwl,
                layer_scale,
                skip,
            }));
        }
        if has(loader, &n("attn.query.proj.weight")) {
            if has(loader, &n("attn.query.down_conv.weight"))
                || has(loader, &n("conv_cpe_dw.weight"))
            {
                return unsupported("query down-sampling or a conditional position encoding");
            }
            let [qo, qi, qk, _] = conv_shape(loader, &n("attn.query.proj.weight"))?;
            let [ko, ki, kk, _] = conv_shape(loader, &n("attn.key.proj.weight"))?;
            let [vo, vi, vk, _] = conv_shape(loader, &n("attn.value.proj.weight"))?;
            if qk != 1 || kk != 1 || vk != 1 || qi != c_in || ki != c_in || vi != c_in {
                return Err(ModelError::Config(format!(
                    "{p}: the attention's projections must be 1x1 from {c_in} channels"
                )));
            }
            if !qo.is_multiple_of(ko) || vo != ko {
                return Err(ModelError::Config(format!(
                    "{p}: query width {qo}, key {ko}, value {vo}: expected heads x key_dim with \
                     value_dim = key_dim"
                )));
            }
            let heads = qo / ko;
            let kv = |which: &str, dim: usize| -> Result<KvPath, ModelError> {
                let down_name = n(&format!("attn.{which}.down_conv.weight"));
                let down = if has(loader, &down_name) {
                    let d = ConvNorm::depthwise(
                        loader,
                        &down_name,
                        &n(&format!("attn.{which}.norm.weight")),
                        2,
                        Act::None,
                    )?;
                    d.expect_in(&down_name, c_in)?;
                    Some(d)
                } else {
                    None
                };
                let proj = loader
                    .linear_view(&n(&format!("attn.{which}.proj.weight")), &[dim, c_in, 1, 1])?;
                Ok(KvPath { down, proj })
            };
            let key = kv("key", ko)?;
            let value = kv("value", vo)?;
            if key.down.is_some() != value.down.is_some() {
                return unsupported("down-sampling only one of K and V");
            }
            let query = loader.linear_view(&n("attn.query.proj.weight"), &[qo, c_in, 1, 1])?;
            let output =
                loader.linear_view(&n("attn.output.proj.weight"), &[c_in, heads * vo, 1, 1])?;
            if stride != 1 {
                return unsupported("a stage opening with an attention block");
            }
            return Ok(Block::Attention(MobileAttention {
                norm: loader.vector(&n("norm.weight"), c_in)?,
                query,
                key,
                value,
                output,
                heads,
                key_dim: ko,
                channels: c_in,
                layer_scale: Self::layer_scale(loader, p, c_in)?,
            }));
        }
        let dw_start_name = n("dw_start.conv.weight");
        let dw_mid_name = n("dw_mid.conv.weight");
        let has_mid = has(loader, &dw_mid_name);
        let dw_start = if has(loader, &dw_start_name) {
            let s = if has_mid { 1 } else { stride };
            let d = ConvNorm::depthwise(
                loader,
                &dw_start_name,
                &n("dw_start.bn.weight"),
                s,
                Act::None,
            )?;
            d.expect_in(&dw_start_name, c_in)?;
            Some(d)
        } else {
            None
        };
        if dw_start.is_none() && !has_mid && stride != 1 {
            return unsupported("a strided UIR block without a depthwise convolution");
        }
        if has(loader, &n("dw_end.conv.weight")) || has(loader, &n("se.conv_reduce.weight")) {
            return unsupported("dw_end or squeeze-excite");
        }
        let pw_exp = ConvNorm::full(
            loader,
            &n("pw_exp.conv.weight"),
            &n("pw_exp.bn.weight"),
            1,
            Act::Gelu,
        )?;
        pw_exp.expect_in(&n("pw_exp.conv.weight"), c_in)?;
        let dw_mid = if has_mid {
            let d = ConvNorm::depthwise(
                loader,
                &dw_mid_name,
                &n("dw_mid.bn.weight"),
                stride,
                Act::Gelu,
            )?;
            d.expect_in(&dw_mid_name, pw_exp.c_out)?;
            Some(d)
        } else {
            None
        };
        let pw_proj = ConvNorm::full(
            loader,
            &n("pw_proj.conv.weight"),
            &n("pw_proj.bn.weight"),
            1,
            Act::None,
        )?;
        pw_proj.expect_in(&n("pw_proj.conv.weight"), pw_exp.c_out)?;
        if pw_exp.kernel != 1 || pw_proj.kernel != 1 {
            return unsupported("k>1 pointwise convolutions");
        }
        let layer_scale = Self::layer_scale(loader, p, pw_proj.c_out)?;
        let skip = stride == 1 && pw_proj.c_out == c_in;
        Ok(Block::Uir(Uir {
            dw_start,
            pw_exp,
            dw_mid,
            pw_proj,
            layer_scale,
            skip,
        }))
    }

    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// Width of the output rows (2048).
    pub fn out_channels(&self) -> usize {
        self.msfa_proj.c_out
    }

    /// Output rows (`output_side²`, 256).
    pub fn out_tokens(&self) -> usize {
        self.output_side * self.output_side
    }

    /// Blocks per stage.
    pub fn stage_depths(&self) -> Vec<usize> {
        self.stages.iter().map(Vec::len).collect()
    }

    /// Bytes of the tower's weights.
    pub fn weight_bytes(&self) -> usize {
        self.stem.bytes()
            + self
                .stages
                .iter()
                .flatten()
                .map(Block::bytes)
                .sum::<usize>()
            + self.msfa_exp.bytes()
            + self.msfa_proj.bytes()
            + 4 * self.msfa_norm.len()
    }

    /// `pixels` (`[3, image_size, image_size]`, channel-major) → `[out_tokens, out_channels]`
    /// (row-major over the output grid: the tower's `[C, H, W]` output permuted to tokens).
    pub fn forward(&self, pool: &ThreadPool, pixels: &[f32]) -> Result<Vec<f32>, ModelError> {
        let side = self.image_size;
        if pixels.len() != 3 * side * side {
            return Err(ModelError::Config(format!(
                "the vision tower takes [3, {side}, {side}] pixels ({} values), got {}",
                3 * side * side,
                pixels.len()
            )));
        }
        if !pixels.iter().all(|v| v.is_finite()) {
            return Err(ModelError::NonFinite {
                where_: "vision tower input pixels".into(),
            });
        }
        let mut s = Scratch::default();
        // CHW → HWC.
        let plane = side * side;
        let mut input = vec![0.0f32; 3 * plane];
        for (p, px) in input.chunks_exact_mut(3).enumerate() {
            for (ch, v) in px.iter_mut().enumerate() {
                *v = pixels[ch * plane + p];
            }
        }
        let mut x = Vec::new();
        let mut side = self.stem.forward(pool, &input, side, &mut x, &mut s);
        drop(input);
        let mut fine: Option<Vec<f32>> = None;
        let n_stages = self.stages.len();
        for (si, stage) in self.stages.iter().enumerate() {
            for block in stage {
                side = self.block(pool, block, &mut x, side, &mut s);
            }
            if si + 2 == n_stages {
                fine = Some(x.clone());
            }
        }
        let fine = fine.expect("at least two stages (checked at load)");
        let (fs, cs) = (self.fine_side, self.coarse_side);
        debug_assert_eq!(side, cs);
        let fine_c = self.stages[n_stages - 2].last().map_or(0, Block::c_out);
        let coarse_c = self.stages[n_stages - 1].last().map_or(0, Block::c_out);
        // Nearest upsampling of the coarse map to the fine grid (index floor(dst · in / out)),
        // concatenated after the fine map's channels.
        let cat_c = fine_c + coarse_c;
        let cat = sized(&mut s.a, fs * fs * cat_c);
        for yy in 0..fs {
            let sy = yy * cs / fs;
            for xx in 0..fs {
                let sx = xx * cs / fs;
                let dst = &mut cat[(yy * fs + xx) * cat_c..][..cat_c];
                dst[..fine_c].copy_from_slice(&fine[(yy * fs + xx) * fine_c..][..fine_c]);
                dst[fine_c..].copy_from_slice(&x[(sy * cs + sx) * coarse_c..][..coarse_c]);
            }
        }
        let cat = std::mem::take(&mut s.a);
        let mut hidden = Vec::new();
        self.msfa_exp
            .forward(pool, &cat[..fs * fs * cat_c], fs, &mut hidden, &mut s);
        drop(cat);
        let mut proj = Vec::new();
        self.msfa_proj.forward(pool, &hidden, fs, &mut proj, &mut s);
        drop(hidden);
        // Average pool to the output grid, then RmsNorm2d.
        let c = self.out_channels();
        let (os, win) = (self.output_side, fs / self.output_side);
        let mut out = vec![0.0f32; os * os * c];
        let inv = 1.0 / (win * win) as f32;
        for oy in 0..os {
            for ox in 0..os {
                let dst = &mut out[(oy * os + ox) * c..][..c];
                for ky in 0..win {
                    for kx in 0..win {
                        let src = &proj[((oy * win + ky) * fs + ox * win + kx) * c..][..c];
                        for (d, v) in dst.iter_mut().zip(src) {
                            *d += v;
                        }
                    }
                }
                dst.iter_mut().for_each(|d| *d *= inv);
            }
        }
        conv::rms_norm_act_rows(pool, &mut out, None, &self.msfa_norm, NORM_EPS, false);
        Ok(out)
    }

    /// One block on `x` (`[side², c]`), replaced by its output; returns the output side.
    fn block(
        &self,
        pool: &ThreadPool,
        block: &Block,
        x: &mut Vec<f32>,
        side: usize,
        s: &mut Scratch,
    ) -> usize {
        match block {
            Block::Edge(b) => {
                let mut t = std::mem::take(&mut s.b);
                let os = b.exp.forward(pool, x, side, &mut t, s);
                let mut y = std::mem::take(&mut s.c);
                b.pwl
                    .forward(pool, &t[..os * os * b.exp.c_out], os, &mut y, s);
                s.b = t;
                let y_len = os * os * b.pwl.c_out;
                finish(
                    &mut y[..y_len],
                    b.layer_scale.as_deref(),
                    b.skip.then_some(&x[..]),
                );
                y.truncate(y_len);
                s.c = std::mem::replace(x, y);
                os
            }
            Block::Uir(b) => {
                let mut cur_side = side;
                let mut start = std::mem::take(&mut s.b);
                let input: &[f32] = if let Some(d) = &b.dw_start {
                    cur_side = d.forward(pool, x, side, &mut start, s);
                    &start[..cur_side * cur_side * d.c_out]
                } else {
                    &x[..]
                };
                let mut exp = std::mem::take(&mut s.c);
                b.pw_exp.forward(pool, input, cur_side, &mut exp, s);
                let mut mid_len = cur_side * cur_side * b.pw_exp.c_out;
                let mut mid_buf = Vec::new();
                let mid: &[f32] = if let Some(d) = &b.dw_mid {
                    mid_buf = std::mem::take(&mut s.k);
                    cur_side = d.forward(pool, &exp[..mid_len], cur_side, &mut mid_buf, s);
                    mid_len = cur_side * cur_side * d.c_out;
                    &mid_buf[..mid_len]
                } else {
                    &exp[..mid_len]
                };
                let mut y = std::mem::take(&mut s.v);
                b.pw_proj.forward(pool, mid, cur_side, &mut y, s);
                let y_len = cur_side * cur_side * b.pw_proj.c_out;
                finish(
                    &mut y[..y_len],
                    b.layer_scale.as_deref(),
                    b.skip.then_some(&x[..]),
                );
                y.truncate(y_len);
                s.b = start;
                s.c = exp;
                if b.dw_mid.is_some() {
                    s.k = mid_buf;
                }
                s.v = std::mem::replace(x, y);
                cur_side
            }
            Block::Attention(b) => {
                self.attention(pool, b, x, side, s);
                side
            }
        }
    }

    fn attention(
        &self,
        pool: &ThreadPool,
        b: &MobileAttention,
        x: &mut Vec<f32>,
        side: usize,
        s: &mut Scratch,
    ) {
        let n = side * side;
        let c = b.channels;
        let x_len = n * c;
        let mut normed_buf = std::mem::take(&mut s.a);
        let normed = sized(&mut normed_buf, x_len);
        normed.copy_from_slice(&x[..x_len]);
        conv::rms_norm_act_rows(pool, normed, None, &b.norm, NORM_EPS, false);
        let normed = &normed_buf[..x_len];
        let q_len = n * b.heads * b.key_dim;
        let mut q = std::mem::take(&mut s.b);
        linear(
            pool,
            &b.query,
            normed,
            n,
            sized(&mut q, q_len),
            &mut s.quantized,
        );
        let kv_out = |path: &KvPath, buf: &mut Vec<f32>, s: &mut Scratch| -> usize {
            let mut down = std::mem::take(&mut s.c);
            let (src, m): (&[f32], usize) = match &path.down {
                Some(d) => {
                    let ds = d.forward(pool, normed, side, &mut down, s);
                    (&down[..ds * ds * c], ds * ds)
                }
                None => (normed, n),
            };
            linear(
                pool,
                &path.proj,
                src,
                m,
                sized(buf, m * b.key_dim),
                &mut s.quantized,
            );
            s.c = down;
            m
        };
        let mut k = std::mem::take(&mut s.k);
        let mut v = std::mem::take(&mut s.v);
        let m = kv_out(&b.key, &mut k, s);
        let m_v = kv_out(&b.value, &mut v, s);
        debug_assert_eq!(m, m_v);
        let params = AttentionParams {
            n_heads: b.heads,
            n_kv_heads: 1,
            head_dim: b.key_dim,
            scale: (b.key_dim as f32).powf(-0.5),
            softcap: None,
            mask: AttentionMask::Causal,
            tiled: true,
        };
        let seg = [KvSegment {
            keys: (&k[..m * b.key_dim]).into(),
            values: (&v[..m * b.key_dim]).into(),
            first_pos: 0,
            len: m,
        }];
        // Every query sees every key: the queries sit after the last key position.
        let mut attn = std::mem::take(&mut s.cols);
        let attn_out = sized(&mut attn, q_len);
        attention(pool, &params, &q[..q_len], m, &seg, attn_out);
        let mut y = std::mem::take(&mut s.c);
        y.truncate(x_len);
        let y_out = sized(&mut y, x_len);
        linear(pool, &b.output, attn_out, n, y_out, &mut s.quantized);
        finish(y_out, b.layer_scale.as_deref(), Some(&x[..x_len]));
        s.c = std::mem::replace(x, y);
        s.a = normed_buf;
        s.b = q;
        s.k = k;
        s.v = v;
        s.cols = attn;
    }
}
