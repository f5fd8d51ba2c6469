//! Quantized data: dequantization, quantization and dot products for every [`GgmlType`].
//!
//! Dot products take one weight row and activations already quantized to
//! [`vec_dot_type`] of the weight type, as llama.cpp does. The implementation (scalar, AVX2,
//! AVX-512, NEON) is chosen once per process from the CPU features, or forced lower with the
//! environment variable `GEMMA_ISA=scalar|avx2|avx512|avx512vnni|neon`.

mod layout;
pub mod scalar;
mod selfcheck;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

use std::sync::OnceLock;

use gemma_formats::GgmlType;

use crate::error::{check_len, KernelError};

/// Turns `src` (`dtype.bytes_for(dst.len())` bytes of `dtype`) into f32 values.
pub fn dequantize(dtype: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    scalar::dequantize(dtype, src, dst)
}

/// Quantizes `src` into `dst` (`dtype.bytes_for(src.len())` bytes) with ggml's round-to-nearest
/// reference quantizers. Supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q8_K;
/// the other K-quants give [`KernelError::QuantizeUnsupported`].
pub fn quantize(dtype: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), KernelError> {
    scalar::quantize(dtype, src, dst)
}

/// The format activations must be quantized to for dot products with weights of `dtype`.
pub fn vec_dot_type(dtype: GgmlType) -> GgmlType {
    match dtype {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => GgmlType::F32,
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => GgmlType::Q8_0,
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => GgmlType::Q8_1,
        GgmlType::Q2_K
        | GgmlType::Q3_K
        | GgmlType::Q4_K
        | GgmlType::Q5_K
        | GgmlType::Q6_K
        | GgmlType::Q8_K => GgmlType::Q8_K,
    }
}

/// Dot product of one weight row of `n` values of `dtype` with `n` activations stored as
/// `vec_dot_type(dtype)`, using the selected ISA.
///
/// # Panics
/// When `w_row` or `act` is not exactly `n` values of its type (a caller bug, not bad data:
/// weight sizes are checked when a [`crate::WeightMatrix`] is built).
#[track_caller]
pub fn vec_dot(dtype: GgmlType, w_row: &[u8], act: &[u8], n: usize) -> f32 {
    assert_dot_sizes(dtype, w_row, act, n);
    let f = selected_kernels().dot(dtype);
    // SAFETY: the table only holds kernels whose CPU features were detected, and sizes match.
    unsafe { f(w_row, act, n) }
}

/// [`vec_dot`] with an explicit ISA (for tests and benchmarks).
///
/// # Panics
/// When `isa` is not available on this CPU, or on size mismatches as [`vec_dot`].
#[track_caller]
pub fn vec_dot_with(isa: Isa, dtype: GgmlType, w_row: &[u8], act: &[u8], n: usize) -> f32 {
    assert!(
        isa.is_available(),
        "ISA {isa:?} is not available on this CPU"
    );
    assert_dot_sizes(dtype, w_row, act, n);
    let f = dot_fn(isa, dtype);
    // SAFETY: availability checked above, sizes checked.
    unsafe { f(w_row, act, n) }
}

/// Instruction sets with their own kernels. Later ones in x86 order include the earlier ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F + BW (plus AVX2 + FMA + F16C).
    Avx512,
    /// [`Isa::Avx512`] plus AVX512-VNNI (`vpdpbusd`).
    Avx512Vnni,
    /// aarch64 Advanced SIMD.
    Neon,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::Neon => "neon",
        }
    }

    pub fn from_name(name: &str) -> Option<Isa> {
        [
            Isa::Scalar,
            Isa::Avx2,
            Isa::Avx512,
            Isa::Avx512Vnni,
            Isa::Neon,
        ]
        .into_iter()
        .find(|isa| isa.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Whether this CPU runs the kernels of `self`.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.is_available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => Isa::Avx512.is_available() && is_x86_feature_detected!("avx512vnni"),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Position in the "includes" order, used to honour `GEMMA_ISA` (forcing a lower ISA).
    fn rank(self) -> u8 {
        match self {
            Isa::Scalar => 0,
            Isa::Avx2 | Isa::Neon => 1,
            Isa::Avx512 => 2,
            Isa::Avx512Vnni => 3,
        }
    }
}

/// Every ISA this CPU supports, lowest first (always starts with [`Isa::Scalar`]).
pub fn available_isas() -> Vec<Isa> {
    [
        Isa::Scalar,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Vnni,
        Isa::Neon,
    ]
    .into_iter()
    .filter(|isa| isa.is_available())
    .collect()
}

/// The ISA [`vec_dot`] and [`crate::matmul`] use: the best available, capped by `GEMMA_ISA`,
/// whose kernels pass a one-time agreement check against the scalar reference.
pub fn selected_isa() -> Isa {
    selected_kernels().isa
}

/// Function type of every dot kernel. Unsafe because SIMD kernels need their CPU features and
/// read `n` values from both slices without bounds checks.
pub(crate) type DotFn = unsafe fn(&[u8], &[u8], usize) -> f32;

/// The dot kernels of one ISA, indexed by `GgmlType as usize`.
pub(crate) struct Kernels {
    pub isa: Isa,
    pub(super) dots: [DotFn; GgmlType::ALL.len()],
}

impl Kernels {
    pub(super) fn for_isa(isa: Isa) -> Kernels {
        Kernels {
            isa,
            dots: std::array::from_fn(|i| dot_fn(isa, GgmlType::ALL[i])),
        }
    }

    #[inline]
    pub fn dot(&self, dtype: GgmlType) -> DotFn {
        self.dots[dtype as usize]
    }
}

pub(crate) fn selected_kernels() -> &'static Kernels {
    static SELECTED: OnceLock<Kernels> = OnceLock::new();
    SELECTED.get_or_init(|| {
        let requested = std::env::var("GEMMA_ISA").ok();
        let mut candidates = available_isas();
        loop {
            let isa = choose_isa(&candidates, requested.as_deref());
            let kernels = Kernels::for_isa(isa);
            if isa == Isa::Scalar || selfcheck::agrees_with_scalar(&kernels) {
                return kernels;
            }
            candidates.retain(|&c| c != isa);
        }
    })
}

/// The best of `available`, capped at the rank of `requested` (a `GEMMA_ISA` value) when that
/// names an ISA. Unknown names are ignored.
pub fn choose_isa(available: &[Isa], requested: Option<&str>) -> Isa {
    let cap = requested
        .and_then(Isa::from_name)
        .map_or(u8::MAX, Isa::rank);
    available
        .iter()
        .copied()
        .filter(|isa| isa.rank() <= cap)
        .max_by_key(|isa| isa.rank())
        .unwrap_or(Isa::Scalar)
}

/// The kernel for `dtype` on `isa`, falling back to the next lower ISA for types without one.
fn dot_fn(isa: Isa, dtype: GgmlType) -> DotFn {
    #[cfg(target_arch = "x86_64")]
    {
        if matches!(isa, Isa::Avx512 | Isa::Avx512Vnni) {
            if let Some(f) = avx512::dot_fn(dtype, isa == Isa::Avx512Vnni) {
                return f;
            }
        }
        if matches!(isa, Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni) {
            if let Some(f) = avx2::dot_fn(dtype) {
                return f;
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if isa == Isa::Neon {
            if let Some(f) = neon::dot_fn(dtype) {
                return f;
            }
        }
    }
    let _ = isa;
    scalar::dot_fn(dtype)
}

/// Panics unless `w_row` holds `n` values of `dtype` and `act` `n` values of its vec_dot type.
#[track_caller]
pub(crate) fn assert_dot_sizes(dtype: GgmlType, w_row: &[u8], act: &[u8], n: usize) {
    if let Err(e) = check_len(dtype, n, w_row.len()) {
        panic!("vec_dot weight row: {e}");
    }
    if let Err(e) = check_len(vec_dot_type(dtype), n, act.len()) {
        panic!("vec_dot activations: {e}");
    }
}
