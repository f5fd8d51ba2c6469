//! gemma-server: `gemma serve`, an OpenAI-compatible HTTP server.
//!
//! - [`routes`]: axum handlers for `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
//!   `/health`, `/metrics`, and the helpers every API surface shares (reading a body,
//!   submitting a prepared request).
//! - [`ollama`]: Ollama's API (`/api/chat`, `/api/generate`, `/api/tags`, `/api/show`,
//!   `/api/ps`, `/api/version`, `/`) over the same preparation and scheduler.
//! - [`responses`]: OpenAI's Responses API (`/v1/responses`), likewise.
//! - [`scheduler`]: one thread owns the model and `parallel` KV-cache slots; all active
//!   sequences advance together (continuous batching), with prefix reuse across requests.
//! - [`constrain`]: llguidance token masks for `response_format` and required tool calls.
//! - [`tools`]: Gemma 3 function calling (prompt rendering, tool choice, call schemas).
//! - [`tool_stream`]: recognizing calls in the reply as it is generated, so their
//!   arguments stream as OpenAI `tool_calls` deltas.
//! - [`media`]: images and audio in chat messages (`image_url` and `input_audio` parts): data
//!   URLs, files under `--allowed-media-dir`, base64 audio, the limits on them.
//! - [`transcribe`]: `/v1/audio/transcriptions` and `/v1/audio/translations` (Gemma 3n), one
//!   generation per 30 s window through the same scheduler.
//! - [`shield`]: `--shield`, the safety filter: classifiers on the request (while the prompt
//!   prefills) and on the reply (window by window), between the scheduler and every writer.

pub mod api;
pub mod constrain;
pub mod error;
pub mod media;
pub mod metrics;
pub mod ollama;
mod prepare;
pub mod responses;
pub mod routes;
pub mod scheduler;
pub mod schema;
pub mod shield;
pub mod tool_stream;
pub mod tools;
pub mod transcribe;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use gemma_engine::LoadedModel;
use tokio::sync::oneshot;

pub use constrain::GrammarCompiler;
pub use media::MediaConfig;
use metrics::Metrics;
use prepare::PrepareContext;
use routes::AppState;
use scheduler::Scheduler;
pub use shield::{ShieldFilter, ShieldOptions};

/// Default `--cache-ram` in MiB: about 17 prompts of 2,400 tokens of the default model (f16
/// cache, 15 MB each), one of Gemma 3 4B (about 170 MB: 29 rings of its 1,024-token window).
pub const DEFAULT_PROMPT_CACHE_MIB: usize = 256;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub host: String,
    /// 0 picks a free port (tests).
    pub port: u16,
    /// Sequences decoded together.
    pub parallel: usize,
    /// KV cache length of each slot.
    pub ctx_size: usize,
    /// Requests waiting for a slot before new ones get 429.
    pub queue_capacity: usize,
    pub request_timeout: Duration,
    pub body_limit: usize,
    /// Where images may come from and what images and audio may cost.
    pub media: MediaConfig,
    /// When set, every endpoint but `/health` and `/metrics` needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// When set, `/metrics` needs `Authorization: Bearer KEY` (it is open otherwise).
    pub metrics_key: Option<String>,
    /// Open connections at most; more are closed as they arrive.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers (and, on a kept-alive
    /// connection, to start the next request): slow or idle clients cannot hold connections.
    pub header_timeout: Duration,
    /// `--shield`: the safety filter on requests and replies.
    pub shield: Option<Arc<ShieldFilter>>,
    /// `--cache-ram`: bytes of prompt prefixes kept beyond the slots (0: none).
    pub prompt_cache_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            parallel: 4,
            ctx_size: 4096,
            queue_capacity: 64,
            request_timeout: Duration::from_secs(600),
            body_limit: 32 * 1024 * 1024,
            media: MediaConfig::default(),
            api_key: None,
            metrics_key: None,
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
            shield: None,
            prompt_cache_bytes: DEFAULT_PROMPT_CACHE_MIB << 20,
        }
    }
}

/// A server running on its own threads (tests, embedding).
pub struct RunningServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl RunningServer {
    /// Stops accepting, finishes in-flight requests and joins the threads.
    pub fn stop(mut self) -> Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// Binds, starts the scheduler and serves on background threads; returns once listening.
pub fn start(loaded: LoadedModel, config: ServerConfig) -> Result<RunningServer> {
    let listener = std::net::TcpListener::bind((config.host.as_str(), config.port))
        .with_context(|| format!("cannot listen on {}:{}", config.host, config.port))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("gemma-http".into())
        .spawn(move || {
            serve_on(loaded, config, listener, async {
                let _ = rx.await;
            })
        })?;
    Ok(RunningServer {
        addr,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

/// `gemma serve`: loads nothing itself; serves until Ctrl-C or SIGTERM, then drains.
pub fn run(loaded: LoadedModel, config: ServerConfig) -> Result<()> {
    let listener = std::net::TcpListener::bind((config.host.as_str(), config.port))
        .with_context(|| format!("cannot listen on {}:{}", config.host, config.port))?;
    listener.set_nonblocking(true)?;
    eprintln!(
        "gemma: serving {} on http://{} ({} slots, context {})",
        model_id(&loaded.source),
        listener.local_addr()?,
        config.parallel,
        config.ctx_size
    );
    serve_on(loaded, config, listener, shutdown_signal())
}

/// Accepts connections until `shutdown`, then lets the open ones finish their requests.
/// Unlike `axum::serve` it bounds what a client can hold: at most `max_connections` at once
/// (more are closed on arrival), and `header_timeout` for a new connection's first byte and
/// for a request's headers (slowloris). (An idle kept-alive connection between two requests
/// is not timed yet; it still counts against `max_connections`.)
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    config: &ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let slots = Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout);
    let builder = Arc::new(builder);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                // Out of file descriptors and the like: wait instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let header_timeout = config.header_timeout;
        tokio::spawn(async move {
            // hyper's header timer starts at a request's first byte: a client that connects
            // and sends nothing is timed out here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            // Errors here are the client's (reset, timed out, malformed): nothing to report.
            let _ = watcher.watch(conn.into_owned()).await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

fn serve_on(
    loaded: LoadedModel,
    config: ServerConfig,
    listener: std::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if config.parallel == 0 || config.ctx_size < 2 || config.queue_capacity == 0 {
        anyhow::bail!("--parallel, the queue capacity and --ctx-size must be positive");
    }
    if loaded.tokenizer.is_none() {
        anyhow::bail!("serving needs a model with a tokenizer");
    }
    let model_id = model_id(&loaded.source);
    let end_token = loaded
        .tokenizer
        .as_ref()
        .and_then(|t| t.token_id("<end_of_turn>").or(t.eos_id()))
        .unwrap_or(1);
    let loaded = Arc::new(loaded);
    let metrics = Arc::new(Metrics::default());
    if let Some(filter) = &config.shield {
        metrics
            .shield_enabled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        metrics.shield.register(&filter.policy_names());
    }
    let (scheduler, scheduler_thread) = Scheduler::start(
        loaded.clone(),
        config.parallel,
        config.ctx_size,
        config.queue_capacity,
        config.prompt_cache_bytes,
        metrics.clone(),
    )?;
    let state = Arc::new(AppState {
        scheduler,
        prepare: Arc::new(PrepareContext {
            loaded,
            ctx_size: config.ctx_size,
            grammar: std::sync::OnceLock::new(),
            end_token,
            media: config.media.clone(),
            media_work: std::sync::Mutex::new(()),
            shield: config.shield.as_ref().map(|f| f.checks_images()),
        }),
        shield: config.shield.clone(),
        metrics,
        model_id,
        body_limit: config.body_limit,
        request_timeout: config.request_timeout,
        api_key: config.api_key.clone(),
        metrics_key: config.metrics_key.clone(),
        card: std::sync::OnceLock::new(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let app = routes::router(state);
        serve_connections(listener, app, &config, shutdown).await;
        anyhow::Ok(())
    })?;
    // The router (and with it the last scheduler handle) is gone: the scheduler finishes its
    // active sequences and exits.
    drop(runtime);
    scheduler_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the scheduler thread panicked"))?;
    Ok(())
}

/// The name clients see in `model` fields: the file name without extension.
fn model_id(source: &Path) -> String {
    source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "gemma".into())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    eprintln!("gemma: shutting down, finishing in-flight requests");
}
