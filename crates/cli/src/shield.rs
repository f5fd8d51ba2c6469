//! `gemma shield`: per-policy probabilities from a safety classifier (ShieldGemma 2 on images,
//! text ShieldGemma on prompts and responses); `--threshold` turns them into an exit code.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use gemma_engine::{
    resolve_policies, ImageOptions, LoadOptions, Modality, PolicySpec, Shield, ShieldInput,
    DEFAULT_BATCH_SIZE,
};

use crate::commands::context_size;
use crate::CommonArgs;

#[derive(Args, Debug)]
pub struct ShieldArgs {
    /// Image to classify (repeatable; needs an image classifier such as ShieldGemma 2)
    #[arg(long = "image", value_name = "FILE")]
    pub images: Vec<PathBuf>,
    /// Text to classify: a user prompt (with --response, the prompt the response answers)
    #[arg(long, value_name = "TEXT", conflicts_with = "file")]
    pub text: Option<String>,
    /// Read the text to classify from a file (`-`: stdin)
    #[arg(long, value_name = "F")]
    pub file: Option<PathBuf>,
    /// A model's response to the --text/--file prompt: the response is classified
    #[arg(long, value_name = "TEXT")]
    pub response: Option<String>,
    /// Built-in policy (repeatable) [default: all of the input's kind] — images: dangerous,
    /// sexual, violence; text: dangerous, harassment, hate, sexual
    #[arg(long = "policy", value_name = "NAME")]
    pub policies: Vec<String>,
    /// A policy of your own, in the built-in policies' style (repeatable)
    #[arg(long = "policy-text", value_name = "TEXT")]
    pub policy_texts: Vec<String>,
    /// Print `{"results": [{"input", "policy", "p_yes"}, ...]}`
    #[arg(long)]
    pub json: bool,
    /// Exit with code 1 when any P(Yes) is above T (errors exit with 2)
    #[arg(long, value_name = "T")]
    pub threshold: Option<f32>,
}

/// Runs the classifier; `Ok(true)` when `--threshold` is given and passed.
pub fn shield(common: &CommonArgs, args: &ShieldArgs) -> Result<bool> {
    // Everything that can be checked without the model is checked first.
    if common.model.is_none() {
        bail!("gemma shield needs --model SHIELD (ShieldGemma 2 for images, ShieldGemma for text)");
    }
    if let Some(t) = args.threshold {
        if !(0.0..=1.0).contains(&t) {
            bail!("--threshold must be a probability between 0 and 1");
        }
    }
    let has_text = args.text.is_some() || args.file.is_some();
    if args.response.is_some() && !has_text {
        bail!("--response needs the prompt it answers (--text or --file)");
    }
    if args.images.is_empty() && !has_text {
        bail!("nothing to classify: give --image FILE, --text TEXT or --file F");
    }
    let mut modalities = Vec::new();
    if !args.images.is_empty() {
        modalities.push(Modality::Image);
    }
    if has_text {
        modalities.push(Modality::Text);
    }
    for name in &args.policies {
        if !modalities.iter().any(|m| m.knows(name)) {
            let known: Vec<String> = modalities
                .iter()
                .map(|m| {
                    let kind = match m {
                        Modality::Image => "images",
                        Modality::Text => "text",
                    };
                    format!("{kind}: {}", m.names().join(", "))
                })
                .collect();
            bail!(
                "unknown policy {name:?} ({}; or give its text with --policy-text)",
                known.join("; ")
            );
        }
    }
    let specs_for = |m: Modality| -> Vec<PolicySpec> {
        let mut specs: Vec<PolicySpec> = args
            .policies
            .iter()
            .filter(|n| m.knows(n))
            .map(|n| PolicySpec::Named(n.clone()))
            .collect();
        specs.extend(args.policy_texts.iter().cloned().map(PolicySpec::Custom));
        specs
    };
    let resolve = |m: Modality| -> Result<Vec<gemma_engine::Policy>> {
        let specs = specs_for(m);
        // Named policies all of the other kind, and no text of one's own: nothing to ask.
        if specs.is_empty() && !args.policies.is_empty() {
            return Ok(Vec::new());
        }
        resolve_policies(m, &specs)
    };
    let image_policies = if args.images.is_empty() {
        Vec::new()
    } else {
        resolve(Modality::Image)?
    };
    let text_policies = if has_text {
        resolve(Modality::Text)?
    } else {
        Vec::new()
    };
    let images: Vec<(String, Vec<u8>)> = args
        .images
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p)
                .with_context(|| format!("cannot read the image {}", p.display()))?;
            Ok((p.display().to_string(), bytes))
        })
        .collect::<Result<_>>()?;
    let text = match (&args.text, &args.file) {
        (Some(t), _) => Some(("text".to_owned(), t.clone())),
        (None, Some(p)) if p.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read the text from stdin")?;
            Some(("stdin".to_owned(), s))
        }
        (None, Some(p)) => {
            let s = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            Some((p.display().to_string(), s))
        }
        (None, None) => None,
    };

    let loaded = common.load(&LoadOptions {
        batch_size: DEFAULT_BATCH_SIZE,
        // Prompts only: the file's layout feeds the int8 GEMM (see LoadOptions::decodes).
        decodes: false,
        ..common.load_options()
    })?;
    let shield = Shield::new(&loaded, context_size(common, &loaded))?;
    for m in &modalities {
        shield.check_modality(*m)?;
    }
    if has_text {
        shield.check_text_policies(&text_policies, args.response.is_some())?;
    }
    let prepared = images
        .iter()
        .map(|(name, bytes)| {
            loaded
                .prepare_image(bytes, &ImageOptions::default())
                .with_context(|| format!("image {name}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut inputs: Vec<ShieldInput<'_>> = images
        .iter()
        .zip(&prepared)
        .map(|((name, _), image)| ShieldInput::Image { label: name, image })
        .collect();
    if let Some((label, prompt)) = &text {
        inputs.push(ShieldInput::Text {
            label: if args.response.is_some() {
                "response"
            } else {
                label
            },
            prompt,
            response: args.response.as_deref(),
        });
    }
    let results = shield.classify(&inputs, &image_policies, &text_policies)?;
    if args.json {
        // Serialized directly (not through `json!`), so P(Yes) prints as the f32 it is.
        let out = std::collections::BTreeMap::from([("results", &results)]);
        println!("{}", serde_json::to_string(&out)?);
    } else {
        for r in &results {
            println!("{:.6}\t{}\t{}", r.p_yes, r.policy, r.input);
        }
    }
    let flagged: Vec<_> = match args.threshold {
        Some(t) => results.iter().filter(|r| r.p_yes > t).collect(),
        None => Vec::new(),
    };
    if let (Some(t), false) = (args.threshold, flagged.is_empty()) {
        if !common.quiet {
            let list: Vec<String> = flagged
                .iter()
                .map(|r| format!("{} on {} ({:.4})", r.policy, r.input, r.p_yes))
                .collect();
            eprintln!("gemma: above --threshold {t}: {}", list.join(", "));
        }
    }
    Ok(!flagged.is_empty())
}
