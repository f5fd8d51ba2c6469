//! `gemma serve`: the OpenAI-compatible HTTP server.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use gemma_server::ServerConfig;

use crate::CommonArgs;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together, each with its own KV cache of --ctx-size tokens
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub parallel: usize,
    /// Requests waiting for a free slot before new ones are refused with 429
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub queue_size: usize,
    /// Seconds a request may take before it is ended
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub timeout: u64,
    /// Largest accepted request body in bytes
    #[arg(long, default_value_t = 4 * 1024 * 1024, value_name = "BYTES")]
    pub body_limit: usize,
}

pub fn serve(common: &CommonArgs, args: &ServeArgs) -> Result<()> {
    if args.parallel == 0 || args.queue_size == 0 || args.timeout == 0 {
        anyhow::bail!("--parallel, --queue-size and --timeout must be at least 1");
    }
    let loaded = common.load(&common.load_options())?;
    let trained = loaded.model.context_length();
    let ctx_size = if trained > 0 {
        common.ctx_size.min(trained)
    } else {
        common.ctx_size
    };
    let config = ServerConfig {
        host: args.host.clone(),
        port: args.port,
        parallel: args.parallel,
        ctx_size,
        queue_capacity: args.queue_size,
        request_timeout: Duration::from_secs(args.timeout),
        body_limit: args.body_limit,
    };
    gemma_server::run(loaded, config)
}

/// `gemma run --json-schema FILE`: generation constrained to the schema, printed to stdout.
pub fn run_json_schema(
    loaded: gemma_engine::LoadedModel,
    ids: &[u32],
    params: &gemma_engine::SamplingParams,
    ctx_size: usize,
    schema_path: &std::path::Path,
) -> Result<()> {
    use std::io::Write;
    let text = std::fs::read_to_string(schema_path)
        .with_context(|| format!("cannot read {}", schema_path.display()))?;
    let schema: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", schema_path.display()))?;
    let mut stdout = std::io::stdout().lock();
    gemma_server::constrain::generate_json(
        std::sync::Arc::new(loaded),
        ids,
        params,
        ctx_size,
        &schema,
        &mut |piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        },
    )?;
    writeln!(stdout)?;
    Ok(())
}
