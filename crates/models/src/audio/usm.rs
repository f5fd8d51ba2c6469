//! Gemma 3n's audio encoder: the USM-style conformer (transformers' `Gemma3nAudioEncoder`), run
//! as a stream.
//!
//! `log-mel [T, 128]` → SSCP (two strided 3×3 convolutions, each followed by a cumulative group
//! norm and ReLU: T/4 frames, one per 40 ms) → `input_proj_linear` → conformer blocks → every
//! `reduction`-th frame (one per 160 ms).
//!
//! The whole encoder is causal apart from the convolutions' look-ahead (an SSCP output frame
//! reads `kernel − 1` input rows past its stride), so it runs as a stream: [`AudioStream::push`]
//! takes mel rows as they arrive and returns the tokens they complete; [`AudioStream::finish`]
//! pads the end as the reference pads a whole clip (zero rows below the last) and returns the
//! rest. Every row is encoded once; the state carried between pushes is what the causal pieces
//! read: the group norms' running sums, the SSCP rows still inside a kernel, each block's last
//! `context_left − 1` keys and values and its light convolution's last `kernel − 1` inputs.
//! Encoding a clip in one push or in many gives the same tokens (up to matmul summation order).
//!
//! Quirks, each applied where it happens:
//! - SSCP padding is `(0, kernel − 1)` in time (bottom only: look-ahead) and `(1, 1)` in
//!   frequency, as the reference hard-codes it; the group norm's statistics run over frequency
//!   and channels *cumulatively over time*, each earlier frame centred on its own running mean.
//! - Norms are Gemma 3n's RMSNorm (`w`, not `1 + w`; eps 1e-6 except the light convolution's,
//!   which use the config's `rms_norm_eps`).
//! - Half-step feed-forwards: `x + residual_weight · post_norm(W2(silu(W1(pre_norm(x)))))`.
//! - Attention: queries scaled by `head_dim^-0.5 / softplus(0) · softplus(per_dim_scale)` (keys
//!   are not scaled); query `t` sees keys `t − (context_left − 1) … t`; the logit is
//!   `q·k + q·r(t − key)` (Transformer-XL: `r` is `pos_proj` of the sinusoidal timing signal of
//!   the distance), soft-capped at `logit_cap`, softmax in f32. The reference computes this in
//!   chunks of `chunk_size` queries with a "relative shift"; with no right context the chunking
//!   changes nothing, so it is one window per query here.
//! - Light convolution: GLU (first half × sigmoid(second half)), a depthwise causal conv
//!   (left pad `kernel − 1`, no bias), norm, SiLU, projection, residual.
//! - The reference's `gradient_clipping` clamps (±1e10) never bind and are left out.
//! - Padded frames: a single clip has none (the feature extractor's frame mask is all true for
//!   one clip; only a batch of clips of different lengths pads), so the encoder takes every
//!   frame as valid, as the reference does for that clip.

use gemma_kernels::ops;
use gemma_kernels::pool::ThreadPool;
use serde_json::Value;

use crate::weights::{linear, linear_shared_input, Linear, Loader};
use crate::ModelError;

/// Eps of the RMSNorms the reference builds with its default (`Gemma3nRMSNorm(dim)`).
const NORM_EPS: f32 = 1e-6;

/// Hyper-parameters of the tower (transformers' `Gemma3nAudioConfig`).
#[derive(Clone, Debug, PartialEq)]
pub struct UsmConfig {
    pub hidden_size: usize,
    /// Mel bins per frame.
    pub input_feat_size: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    /// Keys a query sees before itself, plus one (the reference's `conf_attention_context_left`).
    pub context_left: usize,
    pub chunk_size: usize,
    pub logit_cap: f32,
    pub conv_kernel_size: usize,
    pub reduction_factor: usize,
    pub residual_weight: f32,
    /// Output channels of the two SSCP convolutions.
    pub sscp_channels: [usize; 2],
    /// `(time, frequency)` kernel and stride of each SSCP convolution.
    pub sscp_kernel: [[usize; 2]; 2],
    pub sscp_stride: [[usize; 2]; 2],
    pub sscp_norm_eps: f32,
    pub rms_norm_eps: f32,
}

const MAX_HIDDEN: usize = 1 << 15;
const MAX_LAYERS: usize = 256;
const MAX_FEAT: usize = 4096;
const MAX_CHANNELS: usize = 4096;
const MAX_KERNEL: usize = 64;
const MAX_CONTEXT: usize = 4096;

impl UsmConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Keys before the query that attention reads.
    pub fn max_past(&self) -> usize {
        self.context_left.saturating_sub(1)
    }

    /// Frequency bins after SSCP convolution `i` (pad 1 on each side).
    pub fn sscp_freq_out(&self, i: usize) -> usize {
        let f_in = if i == 0 {
            self.input_feat_size
        } else {
            self.sscp_freq_out(i - 1)
        };
        let [_, kw] = self.sscp_kernel[i];
        let [_, sw] = self.sscp_stride[i];
        (f_in + 2).saturating_sub(kw) / sw.max(1) + 1
    }

    /// Width of the flattened SSCP output (`freq × channels`): `input_proj_linear`'s input.
    pub fn sscp_out_width(&self) -> usize {
        self.sscp_freq_out(1) * self.sscp_channels[1]
    }

    /// Mel frames per output token (`time strides × reduction`): 16 for the published tower,
    /// 160 ms at a 10 ms hop.
    pub fn frames_per_token(&self) -> usize {
        self.sscp_stride[0][0] * self.sscp_stride[1][0] * self.reduction_factor
    }

    /// Reads a transformers `audio_config`, with `Gemma3nAudioConfig`'s defaults for what is
    /// left out.
    pub fn from_hf_config(c: &Value) -> Result<UsmConfig, ModelError> {
        let err = |m: String| ModelError::Config(m);
        let int = |k: &str, default: usize| -> Result<usize, ModelError> {
            match c.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_u64()
                    .map(|v| v as usize)
                    .ok_or_else(|| err(format!("audio_config '{k}' is {v}, expected an integer"))),
            }
        };
        let float = |k: &str, default: f64| -> Result<f32, ModelError> {
            match c.get(k) {
                None | Some(Value::Null) => Ok(default as f32),
                Some(v) => v
                    .as_f64()
                    .map(|v| v as f32)
                    .ok_or_else(|| err(format!("audio_config '{k}' is {v}, expected a number"))),
            }
        };
        let ints = |v: &Value| -> Option<Vec<usize>> {
            v.as_array()?
                .iter()
                .map(|x| x.as_u64().map(|x| x as usize))
                .collect()
        };
        let pair = |k: &str, default: [usize; 2]| -> Result<[usize; 2], ModelError> {
            match c.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => match ints(v).as_deref() {
                    Some(&[a, b]) => Ok([a, b]),
                    _ => Err(err(format!(
                        "audio_config '{k}' is {v}, expected two integers"
                    ))),
                },
            }
        };
        let pairs = |k: &str, default: [[usize; 2]; 2]| -> Result<[[usize; 2]; 2], ModelError> {
            let bad = |v: &Value| {
                err(format!(
                    "audio_config '{k}' is {v}, expected [[h, w], [h, w]]"
                ))
            };
            match c.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => {
                    let rows = v.as_array().ok_or_else(|| bad(v))?;
                    match rows.iter().map(ints).collect::<Option<Vec<_>>>().as_deref() {
                        Some([a, b]) if a.len() == 2 && b.len() == 2 => {
                            Ok([[a[0], a[1]], [b[0], b[1]]])
                        }
                        _ => Err(bad(v)),
                    }
                }
            }
        };
        let right = int("conf_attention_context_right", 0)?;
        if right != 0 {
            return Err(err(format!(
                "audio_config conf_attention_context_right is {right}: only the published causal \
                 attention (0) is supported"
            )));
        }
        let cfg = UsmConfig {
            hidden_size: int("hidden_size", 1536)?,
            input_feat_size: int("input_feat_size", 128)?,
            num_heads: int("conf_num_attention_heads", 8)?,
            num_layers: int("conf_num_hidden_layers", 12)?,
            context_left: int("conf_attention_context_left", 13)?,
            chunk_size: int("conf_attention_chunk_size", 12)?,
            logit_cap: float("conf_attention_logit_cap", 50.0)?,
            conv_kernel_size: int("conf_conv_kernel_size", 5)?,
            reduction_factor: int("conf_reduction_factor", 4)?,
            residual_weight: float("conf_residual_weight", 0.5)?,
            sscp_channels: pair("sscp_conv_channel_size", [128, 32])?,
            sscp_kernel: pairs("sscp_conv_kernel_size", [[3, 3], [3, 3]])?,
            sscp_stride: pairs("sscp_conv_stride_size", [[2, 2], [2, 2]])?,
            sscp_norm_eps: float("sscp_conv_group_norm_eps", 1e-3)?,
            rms_norm_eps: float("rms_norm_eps", 1e-6)?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects what the encoder cannot run: zero or absurd sizes, heads that do not split the
    /// width, an odd width (the timing signal is half sines, half cosines), bad epsilons.
    pub fn validate(&self) -> Result<(), ModelError> {
        let err = |m: String| Err(ModelError::Config(m));
        let ok = |v: usize, max: usize| (1..=max).contains(&v);
        let kernels_ok = self
            .sscp_kernel
            .iter()
            .chain(&self.sscp_stride)
            .flatten()
            .all(|&k| ok(k, MAX_KERNEL));
        if !ok(self.hidden_size, MAX_HIDDEN)
            || !ok(self.input_feat_size, MAX_FEAT)
            || !ok(self.num_layers, MAX_LAYERS)
            || !ok(self.context_left, MAX_CONTEXT)
            || !ok(self.chunk_size, MAX_CONTEXT)
            || !ok(self.conv_kernel_size, MAX_KERNEL)
            || !ok(self.reduction_factor, MAX_KERNEL)
            || !self.sscp_channels.iter().all(|&c| ok(c, MAX_CHANNELS))
            || !kernels_ok
        {
            return err(format!("audio tower sizes out of range: {self:?}"));
        }
        if self.num_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_heads)
            || !self.hidden_size.is_multiple_of(2)
        {
            return err(format!(
                "audio hidden size {} does not split into {} heads (and halves)",
                self.hidden_size, self.num_heads
            ));
        }
        if self
            .sscp_kernel
            .iter()
            .any(|&[_, kw]| kw > self.input_feat_size + 2)
            || self.sscp_freq_out(1) == 0
        {
            return err("audio SSCP kernels are wider than the mel bins".into());
        }
        for (name, v) in [
            ("sscp_conv_group_norm_eps", self.sscp_norm_eps),
            ("rms_norm_eps", self.rms_norm_eps),
        ] {
            if !v.is_finite() || v <= 0.0 {
                return err(format!("audio_config {name} {v} must be positive"));
            }
        }
        if !self.logit_cap.is_finite() || self.logit_cap <= 0.0 || !self.residual_weight.is_finite()
        {
            return err(
                "audio_config logit cap or residual weight is not a positive number".into(),
            );
        }
        Ok(())
    }
}

/// One SSCP block: convolution (no bias) + cumulative group norm (weight only) + ReLU.
struct SscpBlock {
    /// `[out, in · kh · kw]`: the conv weight `[out, in, kh, kw]` as a matrix.
    conv: Linear,
    norm: Vec<f32>,
    c_in: usize,
    c_out: usize,
    f_in: usize,
    f_out: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    /// The group norm's epsilon.
    eps: f32,
}

/// `Gemma3nAudioConformerFeedForward`.
struct FeedForward {
    pre_layer_norm: Vec<f32>,
    ffw_layer_1: Linear,
    ffw_layer_2: Linear,
    post_layer_norm: Vec<f32>,
}

/// `Gemma3nAudioConformerAttention` with its `Gemma3nAudioAttention`.
struct Attention {
    pre_attn_norm: Vec<f32>,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    /// `head_dim^-0.5 / softplus(0) · softplus(per_dim_scale)`, per head dimension.
    q_scale: Vec<f32>,
    /// `pos_proj(timing(d))` for distances `d = 0 ..= max_past`: `[max_past + 1, hidden]`.
    relative: Vec<f32>,
    post: Linear,
    post_norm: Vec<f32>,
}

/// `Gemma3nAudioConformerLightConv1d`.
struct LightConv {
    pre_layer_norm: Vec<f32>,
    linear_start: Linear,
    /// `[hidden, kernel]` (the stored `[hidden, 1, kernel]`).
    depthwise_conv1d: Vec<f32>,
    conv_norm: Vec<f32>,
    linear_end: Linear,
}

struct ConformerBlock {
    ffw_layer_start: FeedForward,
    attention: Attention,
    lconv1d: LightConv,
    ffw_layer_end: FeedForward,
    norm: Vec<f32>,
}

/// The encoder's weights. [`UsmEncoder::stream`] runs it.
pub struct UsmEncoder {
    config: UsmConfig,
    sscp: [SscpBlock; 2],
    input_proj_linear: Linear,
    conformer: Vec<ConformerBlock>,
}

/// The sinusoidal timing signal of position `pos`: `[sin(pos·τ_i)…, cos(pos·τ_i)…]` with
/// `τ_i = exp(−i · ln(10⁴) / max(channels/2 − 1, 1))`, as the reference builds it (f32).
fn timing_signal(pos: usize, channels: usize) -> Vec<f32> {
    let half = channels / 2;
    // The increment is a Python float (f64) in the reference; the products are f32.
    let increment = ((1.0e4f64).ln() / half.saturating_sub(1).max(1) as f64) as f32;
    let mut out = vec![0.0; channels];
    for i in 0..half {
        let inv = (-(i as f32) * increment).exp();
        let t = pos as f32 * inv;
        out[i] = t.sin();
        out[half + i] = t.cos();
    }
    out
}

fn softplus(x: f32) -> f32 {
    // torch's softplus (beta 1, threshold 20).
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

impl UsmEncoder {
    /// Loads the tower from tensors named as transformers names them under `prefix`
    /// (`model.audio_tower.` in the published checkpoints).
    pub fn load(
        config: UsmConfig,
        loader: &Loader,
        prefix: &str,
    ) -> Result<UsmEncoder, ModelError> {
        config.validate()?;
        let c = &config;
        let d = c.hidden_size;
        let vector = |n: &str, len| loader.vector(&format!("{prefix}{n}"), len);
        let lin = |n: &str, rows, cols| loader.linear(&format!("{prefix}{n}.weight"), rows, cols);
        let sscp_block = |i: usize| -> Result<SscpBlock, ModelError> {
            let c_in = if i == 0 { 1 } else { c.sscp_channels[0] };
            let c_out = c.sscp_channels[i];
            let [kh, kw] = c.sscp_kernel[i];
            let p = format!("{prefix}subsample_conv_projection.conv_{i}.");
            Ok(SscpBlock {
                conv: loader.linear_view(&format!("{p}conv.weight"), &[c_out, c_in, kh, kw])?,
                norm: loader.vector(&format!("{p}norm.weight"), c_out)?,
                c_in,
                c_out,
                f_in: if i == 0 {
                    c.input_feat_size
                } else {
                    c.sscp_freq_out(0)
                },
                f_out: c.sscp_freq_out(i),
                kernel: c.sscp_kernel[i],
                stride: c.sscp_stride[i],
                eps: c.sscp_norm_eps,
            })
        };
        let sscp = [sscp_block(0)?, sscp_block(1)?];
        let input_proj_linear = lin(
            "subsample_conv_projection.input_proj_linear",
            d,
            c.sscp_out_width(),
        )?;
        let hd = c.head_dim();
        let timing: Vec<f32> = (0..=c.max_past())
            .flat_map(|pos| timing_signal(pos, d))
            .collect();
        let q_base = (hd as f32).powf(-0.5) / softplus(0.0);
        let mut conformer = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let b = format!("conformer.{l}.");
            let ffw = |name: &str| -> Result<FeedForward, ModelError> {
                let p = format!("{b}{name}.");
                Ok(FeedForward {
                    pre_layer_norm: vector(&format!("{p}pre_layer_norm.weight"), d)?,
                    ffw_layer_1: lin(&format!("{p}ffw_layer_1"), 4 * d, d)?,
                    ffw_layer_2: lin(&format!("{p}ffw_layer_2"), d, 4 * d)?,
                    post_layer_norm: vector(&format!("{p}post_layer_norm.weight"), d)?,
                })
            };
            let a = format!("{b}attention.");
            let pos_proj = lin(
                &format!("{a}attn.relative_position_embedding.pos_proj"),
                d,
                d,
            )?;
            // The projected timing signals are the same for every input: computed once here.
            let mut relative = vec![0.0; timing.len()];
            let mut scratch = Vec::new();
            linear(
                ThreadPool::global(),
                &pos_proj,
                &timing,
                c.max_past() + 1,
                &mut relative,
                &mut scratch,
            );
            let per_dim_scale = vector(&format!("{a}attn.per_dim_scale"), hd)?;
            let attention = Attention {
                pre_attn_norm: vector(&format!("{a}pre_attn_norm.weight"), d)?,
                q_proj: lin(&format!("{a}attn.q_proj"), d, d)?,
                k_proj: lin(&format!("{a}attn.k_proj"), d, d)?,
                v_proj: lin(&format!("{a}attn.v_proj"), d, d)?,
                q_scale: per_dim_scale
                    .iter()
                    .map(|&s| q_base * softplus(s))
                    .collect(),
                relative,
                post: lin(&format!("{a}post"), d, d)?,
                post_norm: vector(&format!("{a}post_norm.weight"), d)?,
            };
            let k = c.conv_kernel_size;
            let lc = format!("{b}lconv1d.");
            let dw_name = format!("{prefix}{lc}depthwise_conv1d.weight");
            let dw = loader.linear_view(&dw_name, &[d, 1, k])?;
            let mut depthwise_conv1d = vec![0.0; d * k];
            gemma_kernels::quant::dequantize(dw.dtype, dw.matrix().data, &mut depthwise_conv1d)
                .map_err(|_| ModelError::TensorType {
                    name: dw_name,
                    dtype: dw.dtype,
                })?;
            let lconv1d = LightConv {
                pre_layer_norm: vector(&format!("{lc}pre_layer_norm.weight"), d)?,
                linear_start: lin(&format!("{lc}linear_start"), 2 * d, d)?,
                depthwise_conv1d,
                conv_norm: vector(&format!("{lc}conv_norm.weight"), d)?,
                linear_end: lin(&format!("{lc}linear_end"), d, d)?,
            };
            conformer.push(ConformerBlock {
                ffw_layer_start: ffw("ffw_layer_start")?,
                attention,
                lconv1d,
                ffw_layer_end: ffw("ffw_layer_end")?,
                norm: vector(&format!("{b}norm.weight"), d)?,
            });
        }
        Ok(UsmEncoder {
            config,
            sscp,
            input_proj_linear,
            conformer,
        })
    }

    pub fn config(&self) -> &UsmConfig {
        &self.config
    }

    /// Bytes of the tower's weights.
    pub fn weight_bytes(&self) -> usize {
        let ffw = |f: &FeedForward| f.ffw_layer_1.bytes() + f.ffw_layer_2.bytes();
        self.sscp.iter().map(|b| b.conv.bytes()).sum::<usize>()
            + self.input_proj_linear.bytes()
            + self
                .conformer
                .iter()
                .map(|b| {
                    let a = &b.attention;
                    ffw(&b.ffw_layer_start)
                        + ffw(&b.ffw_layer_end)
                        + a.q_proj.bytes()
                        + a.k_proj.bytes()
                        + a.v_proj.bytes()
                        + a.post.bytes()
                        + b.lconv1d.linear_start.bytes()
                        + b.lconv1d.linear_end.bytes()
                })
                .sum::<usize>()
    }

    /// Stores every matrix the encoder multiplies by per frame as `dtype` (e.g. Q8_0: half the
    /// bytes of the published bf16, read once per pushed chunk, on int8 dot products). The
    /// convolutions and the embedder stay as stored.
    pub fn requantize(&mut self, dtype: gemma_formats::GgmlType) {
        let q = |l: &mut Linear| *l = l.requantized(dtype);
        q(&mut self.input_proj_linear);
        for b in &mut self.conformer {
            for f in [&mut b.ffw_layer_start, &mut b.ffw_layer_end] {
                q(&mut f.ffw_layer_1);
                q(&mut f.ffw_layer_2);
            }
            let a = &mut b.attention;
            for l in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.post] {
                q(l);
            }
            q(&mut b.lconv1d.linear_start);
            q(&mut b.lconv1d.linear_end);
        }
    }

    /// A fresh stream: no audio seen yet.
    pub fn stream(&self) -> AudioStream<'_> {
        let c = &self.config;
        AudioStream {
            encoder: self,
            sscp: [SscpState::default(), SscpState::default()],
            layers: (0..c.num_layers).map(|_| LayerState::default()).collect(),
            frames_in: 0,
            conformer_frames: 0,
            finished: false,
        }
    }

    /// Encodes a whole clip: `features` is `[frames, input_feat_size]` log-mel; returns
    /// `[tokens, hidden]`, one row per `frames_per_token()` frames (rounded up), as the
    /// reference's `audio_tower(...).last_hidden_state` for that clip.
    pub fn encode(&self, features: &[f32]) -> Result<Vec<f32>, ModelError> {
        let mut s = self.stream();
        let mut out = s.push(features)?;
        out.extend(s.finish()?);
        Ok(out)
    }
}

/// A cumulative group norm's running statistics and a convolution's pending input rows.
#[derive(Default)]
struct SscpState {
    /// Input rows not yet fully consumed, `[rows, f_in · c_in]` (channels last), starting at
    /// absolute row `first_row`.
    pending: Vec<f32>,
    first_row: usize,
    /// Input rows seen so far.
    rows_in: usize,
    /// Output rows produced so far.
    rows_out: usize,
    sum: f64,
    sum_sq_diff: f64,
    count: f64,
}

/// What a conformer block keeps between pushes.
#[derive(Default)]
struct LayerState {
    /// The last `max_past` frames' keys and values, `[frames, hidden]`, oldest first.
    keys: Vec<f32>,
    values: Vec<f32>,
    /// The last `kernel − 1` inputs of the depthwise convolution, `[frames, hidden]`.
    conv_history: Vec<f32>,
}

/// An encoder run over audio that arrives in pieces. See the module docs.
pub struct AudioStream<'e> {
    encoder: &'e UsmEncoder,
    sscp: [SscpState; 2],
    layers: Vec<LayerState>,
    /// Mel frames pushed so far.
    frames_in: usize,
    /// Conformer frames produced so far (the reduction keeps those whose index is a multiple
    /// of the factor).
    conformer_frames: usize,
    finished: bool,
}

impl AudioStream<'_> {
    /// Mel frames pushed so far.
    pub fn frames_in(&self) -> usize {
        self.frames_in
    }

    /// Tokens produced so far.
    pub fn tokens_out(&self) -> usize {
        self.conformer_frames
            .div_ceil(self.encoder.config.reduction_factor)
    }

    /// Feeds `features` (`[frames, input_feat_size]` log-mel, the frames after those already
    /// pushed) and returns the tokens they complete, `[tokens, hidden]`.
    pub fn push(&mut self, features: &[f32]) -> Result<Vec<f32>, ModelError> {
        self.run(features, false)
    }

    /// Ends the clip: the convolutions see the reference's zero padding below the last row,
    /// and the remaining tokens come out. A stream that saw no audio is an error.
    pub fn finish(&mut self) -> Result<Vec<f32>, ModelError> {
        if self.frames_in == 0 {
            return Err(ModelError::Config("the audio clip has no frames".into()));
        }
        self.run(&[], true)
    }

    fn run(&mut self, features: &[f32], last: bool) -> Result<Vec<f32>, ModelError> {
        let enc = self.encoder;
        let c = &enc.config;
        if self.finished {
            return Err(ModelError::Config(
                "the audio stream has already ended".into(),
            ));
        }
        if !features.len().is_multiple_of(c.input_feat_size) {
            return Err(ModelError::Config(format!(
                "{} feature values are not whole frames of {} mel bins",
                features.len(),
                c.input_feat_size
            )));
        }
        if !ops::all_finite(features) {
            return Err(ModelError::Config(
                "the audio features hold NaN or infinite values".into(),
            ));
        }
        self.finished = last;
        self.frames_in += features.len() / c.input_feat_size;
        let pool = ThreadPool::global();
        let mut scratch = Vec::new();
        let x = sscp_push(
            pool,
            &enc.sscp[0],
            &mut self.sscp[0],
            features,
            last,
            &mut scratch,
        );
        let x = sscp_push(
            pool,
            &enc.sscp[1],
            &mut self.sscp[1],
            &x,
            last,
            &mut scratch,
        );
        let n = x.len() / c.sscp_out_width();
        if n == 0 {
            return Ok(Vec::new());
        }
        let d = c.hidden_size;
        let mut h = vec![0.0; n * d];
        linear(pool, &enc.input_proj_linear, &x, n, &mut h, &mut scratch);
        for (block, state) in enc.conformer.iter().zip(&mut self.layers) {
            conformer_block(pool, c, block, state, &mut h, n, &mut scratch);
        }
        // Reduction: keep the frames whose index is a multiple of the factor.
        let r = c.reduction_factor;
        let first = self.conformer_frames;
        self.conformer_frames += n;
        let out: Vec<f32> = h
            .chunks_exact(d)
            .enumerate()
            .filter(|(i, _)| (first + i).is_multiple_of(r))
            .flat_map(|(_, row)| row.iter().copied())
            .collect();
        if !ops::all_finite(&out) {
            return Err(ModelError::NonFinite {
                where_: "the audio encoder".into(),
            });
        }
        Ok(out)
    }
}

/// Runs SSCP block `b` over newly arrived input rows (`[rows, f_in · c_in]`, channels last) and
/// returns the output rows they complete (`[rows, f_out · c_out]`, channels last), normed and
/// ReLU'd. With `last`, rows past the input are the reference's zero padding.
fn sscp_push(
    pool: &ThreadPool,
    b: &SscpBlock,
    s: &mut SscpState,
    input: &[f32],
    last: bool,
    scratch: &mut Vec<u8>,
) -> Vec<f32> {
    let in_row = b.f_in * b.c_in;
    s.pending.extend_from_slice(input);
    s.rows_in += input.len() / in_row;
    let [kh, kw] = b.kernel;
    let [sh, sw] = b.stride;
    // Output row t reads input rows sh·t .. sh·t + kh − 1; at the end, rows past the input are
    // zeros and the reference stops at (T + kh − 1 − kh) / sh + 1 rows.
    let end = if last {
        if s.rows_in == 0 {
            0
        } else {
            (s.rows_in - 1) / sh + 1
        }
    } else if s.rows_in >= kh {
        (s.rows_in - kh) / sh + 1
    } else {
        0
    };
    let n_out = end.saturating_sub(s.rows_out);
    let out_row = b.f_out * b.c_out;
    if n_out == 0 {
        return Vec::new();
    }
    // im2col: one row per output (t, f), patch values in (channel, kh, kw) order.
    let patch = b.c_in * kh * kw;
    let mut cols = vec![0.0f32; n_out * b.f_out * patch];
    for (ti, t_rows) in cols.chunks_exact_mut(b.f_out * patch).enumerate() {
        let t = s.rows_out + ti;
        for (f, p) in t_rows.chunks_exact_mut(patch).enumerate() {
            for i in 0..kh {
                let row = sh * t + i;
                if row >= s.rows_in {
                    continue; // bottom padding
                }
                let src = &s.pending[(row - s.first_row) * in_row..][..in_row];
                for j in 0..kw {
                    // Frequency padding: one zero column on each side.
                    let Some(fi) = (sw * f + j).checked_sub(1).filter(|&fi| fi < b.f_in) else {
                        continue;
                    };
                    for ci in 0..b.c_in {
                        p[ci * kh * kw + i * kw + j] = src[fi * b.c_in + ci];
                    }
                }
            }
        }
    }
    let mut y = vec![0.0f32; n_out * out_row];
    linear(pool, &b.conv, &cols, n_out * b.f_out, &mut y, scratch);
    // Cumulative group norm over (frequency, channels), causal in time; then ReLU.
    for row in y.chunks_exact_mut(out_row) {
        s.sum += row.iter().map(|&v| v as f64).sum::<f64>();
        s.count += out_row as f64;
        let mean = s.sum / s.count;
        s.sum_sq_diff += row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>();
        let var = s.sum_sq_diff / s.count;
        let inv = 1.0 / (var + b.eps as f64).sqrt();
        for px in row.chunks_exact_mut(b.c_out) {
            for (v, w) in px.iter_mut().zip(&b.norm) {
                *v = (((*v as f64 - mean) * inv) as f32 * w).max(0.0);
            }
        }
    }
    s.rows_out = end;
    // Drop the input rows no later output reads.
    let keep_from = (sh * end).min(s.rows_in);
    if keep_from > s.first_row {
        let drop = (keep_from - s.first_row) * in_row;
        s.pending.drain(..drop);
        s.first_row = keep_from;
    }
    y
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// One conformer block over `n` new frames `h` (`[n, hidden]`), in place.
fn conformer_block(
    pool: &ThreadPool,
    c: &UsmConfig,
    b: &ConformerBlock,
    s: &mut LayerState,
    h: &mut [f32],
    n: usize,
    scratch: &mut Vec<u8>,
) {
    feed_forward(pool, c, &b.ffw_layer_start, h, n, scratch);
    attention(pool, c, &b.attention, s, h, n, scratch);
    light_conv(pool, c, &b.lconv1d, s, h, n, scratch);
    feed_forward(pool, c, &b.ffw_layer_end, h, n, scratch);
    ops::rms_norm_inplace(h, &b.norm, NORM_EPS);
}

/// `h += residual_weight · post_norm(W2(silu(W1(pre_norm(h)))))`.
fn feed_forward(
    pool: &ThreadPool,
    c: &UsmConfig,
    f: &FeedForward,
    h: &mut [f32],
    n: usize,
    scratch: &mut Vec<u8>,
) {
    let d = c.hidden_size;
    let mut x = h.to_vec();
    ops::rms_norm_inplace(&mut x, &f.pre_layer_norm, NORM_EPS);
    let mut mid = vec![0.0; n * f.ffw_layer_1.rows];
    linear(pool, &f.ffw_layer_1, &x, n, &mut mid, scratch);
    mid.iter_mut().for_each(|v| *v = silu(*v));
    let mut y = vec![0.0; n * d];
    linear(pool, &f.ffw_layer_2, &mid, n, &mut y, scratch);
    ops::rms_norm_inplace(&mut y, &f.post_layer_norm, NORM_EPS);
    for (hv, yv) in h.iter_mut().zip(&y) {
        *hv += c.residual_weight * yv;
    }
}

/// `h += post_norm(post(local_attention(pre_attn_norm(h))))`, the keys and values of earlier
/// pushes read from `s`.
fn attention(
    pool: &ThreadPool,
    c: &UsmConfig,
    a: &Attention,
    s: &mut LayerState,
    h: &mut [f32],
    n: usize,
    scratch: &mut Vec<u8>,
) {
    let d = c.hidden_size;
    let hd = c.head_dim();
    let past = c.max_past();
    let mut x = h.to_vec();
    ops::rms_norm_inplace(&mut x, &a.pre_attn_norm, NORM_EPS);
    let mut q = vec![0.0; n * d];
    let mut k = vec![0.0; n * d];
    let mut v = vec![0.0; n * d];
    linear_shared_input(
        pool,
        [&a.q_proj, &a.k_proj, &a.v_proj],
        &x,
        n,
        [&mut q, &mut k, &mut v],
        scratch,
    );
    for head in q.chunks_exact_mut(hd) {
        for (qv, sv) in head.iter_mut().zip(&a.q_scale) {
            *qv *= sv;
        }
    }
    // Keys and values of the earlier frames a query may still see, then this push's.
    let hist = s.keys.len() / d;
    s.keys.extend_from_slice(&k);
    s.values.extend_from_slice(&v);
    let (keys, values) = (&s.keys, &s.values);
    let mut ctx = vec![0.0f32; n * d];
    let mut logits = vec![0.0f32; past + 1];
    for t in 0..n {
        let at = hist + t;
        let first = at.saturating_sub(past);
        for head in 0..c.num_heads {
            let qh = &q[t * d + head * hd..][..hd];
            let window = &mut logits[..at - first + 1];
            for (j, l) in (first..=at).zip(window.iter_mut()) {
                let kh = &keys[j * d + head * hd..][..hd];
                let rh = &a.relative[(at - j) * d + head * hd..][..hd];
                let dot: f32 = qh
                    .iter()
                    .zip(kh.iter().zip(rh))
                    .map(|(qv, (kv, rv))| qv * kv + qv * rv)
                    .sum();
                *l = (dot / c.logit_cap).tanh() * c.logit_cap;
            }
            ops::softmax_inplace(window);
            let out = &mut ctx[t * d + head * hd..][..hd];
            for (j, &p) in (first..=at).zip(window.iter()) {
                let vh = &values[j * d + head * hd..][..hd];
                for (o, vv) in out.iter_mut().zip(vh) {
                    *o += p * vv;
                }
            }
        }
    }
    // Keep only what the next push's queries can reach.
    let total = hist + n;
    if total > past {
        let drop = (total - past) * d;
        s.keys.drain(..drop);
        s.values.drain(..drop);
    }
    let mut y = vec![0.0; n * d];
    linear(pool, &a.post, &ctx, n, &mut y, scratch);
    ops::rms_norm_inplace(&mut y, &a.post_norm, NORM_EPS);
    ops::add_inplace(h, &y);
}

/// `h += linear_end(silu(conv_norm(depthwise_causal(glu(linear_start(pre_norm(h)))))))`, the
/// convolution's earlier inputs read from `s`.
fn light_conv(
    pool: &ThreadPool,
    c: &UsmConfig,
    l: &LightConv,
    s: &mut LayerState,
    h: &mut [f32],
    n: usize,
    scratch: &mut Vec<u8>,
) {
    let d = c.hidden_size;
    let k = c.conv_kernel_size;
    let mut x = h.to_vec();
    ops::rms_norm_inplace(&mut x, &l.pre_layer_norm, c.rms_norm_eps);
    let mut g = vec![0.0; n * 2 * d];
    linear(pool, &l.linear_start, &x, n, &mut g, scratch);
    // The convolution's input: the earlier frames it still reads (zeros before the first),
    // then GLU of this push's frames.
    if s.conv_history.is_empty() {
        s.conv_history = vec![0.0; (k - 1) * d];
    }
    for row in g.chunks_exact(2 * d) {
        let (a, b) = row.split_at(d);
        s.conv_history
            .extend(a.iter().zip(b).map(|(&a, &b)| a * sigmoid(b)));
    }
    let conv_in = &s.conv_history;
    let mut y = vec![0.0f32; n * d];
    for (t, out) in y.chunks_exact_mut(d).enumerate() {
        for (ch, o) in out.iter_mut().enumerate() {
            let w = &l.depthwise_conv1d[ch * k..][..k];
            *o = (0..k).map(|j| w[j] * conv_in[(t + j) * d + ch]).sum();
        }
    }
    let keep = (k - 1) * d;
    let len = s.conv_history.len();
    s.conv_history.drain(..len - keep);
    ops::rms_norm_inplace(&mut y, &l.conv_norm, c.rms_norm_eps);
    y.iter_mut().for_each(|v| *v = silu(*v));
    let mut out = vec![0.0; n * d];
    linear(pool, &l.linear_end, &y, n, &mut out, scratch);
    ops::add_inplace(h, &out);
}
