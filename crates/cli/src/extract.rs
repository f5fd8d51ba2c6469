//! `gemma extract`: a Gemma 3n MatFormer sub-model, or the same model with its per-layer
//! embedding table requantized, written as a standalone GGUF.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use gemma_engine::gemma_formats::{GgmlType, GgufFile};
use gemma_engine::gemma_models::gemma3n::{extract_gguf, ExtractOptions};
use gemma_engine::{human_bytes, MatformerConfig};

use crate::CommonArgs;

#[derive(Args)]
pub struct ExtractArgs {
    /// Source Gemma 3n GGUF file
    pub input: PathBuf,
    /// Where to write the extracted GGUF
    pub output: PathBuf,
    /// Store the per-layer embedding table as this type: q8_0, q4_0, f16 or f32
    #[arg(long, value_name = "TYPE")]
    pub ple_type: Option<String>,
}

pub fn extract(common: &CommonArgs, args: &ExtractArgs) -> Result<()> {
    if common.matformer.is_none() && args.ple_type.is_none() {
        bail!("nothing to extract: give --matformer CONFIG and/or --ple-type TYPE");
    }
    if args.input == args.output {
        bail!("the output must be a different file from the input");
    }
    let matformer = common
        .matformer
        .as_deref()
        .map(MatformerConfig::from_file)
        .transpose()?;
    let ple_type = args.ple_type.as_deref().map(parse_ple_type).transpose()?;
    let src = GgufFile::open(&args.input)
        .with_context(|| format!("cannot open {}", args.input.display()))?;
    let writer = extract_gguf(
        &src,
        &ExtractOptions {
            matformer,
            ple_type,
        },
    )
    .with_context(|| format!("cannot extract from {}", args.input.display()))?;
    writer
        .write_file(&args.output)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    if !common.quiet {
        let size = std::fs::metadata(&args.output)
            .map(|m| m.len())
            .unwrap_or(0);
        eprintln!(
            "gemma: wrote {} ({}, was {})",
            args.output.display(),
            human_bytes(size as usize),
            human_bytes(src.file_size())
        );
    }
    Ok(())
}

fn parse_ple_type(name: &str) -> Result<GgmlType> {
    match name.to_ascii_lowercase().as_str() {
        "q8_0" => Ok(GgmlType::Q8_0),
        "q4_0" => Ok(GgmlType::Q4_0),
        "f16" => Ok(GgmlType::F16),
        "f32" => Ok(GgmlType::F32),
        other => bail!("--ple-type {other} is not supported (q8_0, q4_0, f16, f32)"),
    }
}
