//! HTTP handlers: parse and validate on the async runtime, prepare on a blocking thread,
//! generate on the scheduler thread, and write JSON or server-sent events back.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gemma_engine::sampling::SplitMix64;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::{FunctionCall, ToolCall};
use crate::api::{TokenLogprob, Usage};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::ollama;
use crate::prepare::{deadline, PrepareContext, Prepared};
use crate::scheduler::{FinishReason, Job, JobEvent, Scheduler, SubmitError};
use crate::tool_stream::{CallEvent, CallParser, ParsedCall};
use crate::tools::ToolMode;

pub struct AppState {
    pub scheduler: Scheduler,
    pub prepare: Arc<PrepareContext>,
    pub metrics: Arc<Metrics>,
    pub model_id: String,
    pub body_limit: usize,
    pub request_timeout: Duration,
    /// `--api-key`: needed on every endpoint but `/health` and `/metrics`.
    pub api_key: Option<String>,
    /// `--metrics-key`: needed on `/metrics`.
    pub metrics_key: Option<String>,
    /// What the Ollama endpoints say about the model (computed on first use).
    pub card: std::sync::OnceLock<Arc<crate::ollama::ModelCard>>,
    /// `--shield`: the safety filter.
    pub shield: Option<Arc<crate::shield::ShieldFilter>>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/responses", post(crate::responses::create))
        // Multipart uploads: axum's form reader enforces the body limit as it reads.
        .route(
            "/v1/audio/transcriptions",
            post(crate::transcribe::transcriptions).layer(DefaultBodyLimit::max(state.body_limit)),
        )
        .route(
            "/v1/audio/translations",
            post(crate::transcribe::translations).layer(DefaultBodyLimit::max(state.body_limit)),
        )
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/", get(ollama::root).head(ollama::root))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags))
        .route("/api/ps", get(ollama::ps))
        .route("/api/show", post(ollama::show))
        .route("/api/version", get(ollama::version))
        .fallback(|uri: axum::http::Uri| async move {
            let error = ApiError::not_found("no such endpoint");
            if is_ollama_path(uri.path()) {
                ollama_shaped(error)
            } else {
                error.into_response()
            }
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_key,
        ))
        // Browser-based clients (playgrounds, notebooks) call from other origins.
        .layer(tower_http::cors::CorsLayer::permissive())
        .with_state(state)
}

/// Checks `Authorization: Bearer KEY` where a key is configured for the path: the API key
/// everywhere but `/health` and `/metrics`, the metrics key on `/metrics`. A CORS preflight
/// (OPTIONS) never carries credentials and passes.
async fn require_key(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let key = match request.uri().path() {
        "/health" | "/" => None,
        "/metrics" => state.metrics_key.as_deref(),
        _ => state.api_key.as_deref(),
    };
    if let Some(key) = key {
        if request.method() != axum::http::Method::OPTIONS {
            let given = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
                let error = ApiError {
                    status: StatusCode::UNAUTHORIZED,
                    ..ApiError::bad_request(
                        "missing or wrong API key (send Authorization: Bearer KEY)",
                    )
                };
                if is_ollama_path(request.uri().path()) {
                    return ollama_shaped(error);
                }
                return error.into_response();
            }
        }
    }
    next.run(request).await
}

/// Paths of Ollama's API, whose errors are `{"error": "message"}`.
fn is_ollama_path(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

fn ollama_shaped(error: ApiError) -> Response {
    (error.status, Json(json!({"error": error.message}))).into_response()
}

/// Whether `a == b`, taking the same time wherever they differ (the key's length is not
/// secret-dependent here: the loop always runs over the longer of the two).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": state.model_id, "object": "model", "created": now_secs(), "owned_by": "gemma-rs"}],
    }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Which response shape to write.
#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Chat,
    Completion,
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate(state, &headers, body, Endpoint::Chat, PrepareContext::chat).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate(
        state,
        &headers,
        body,
        Endpoint::Completion,
        PrepareContext::completion,
    )
    .await
}

/// Parses a request body of type `R`, prepares it off the runtime and answers it.
async fn generate<R: DeserializeOwned + Send + 'static>(
    state: Arc<AppState>,
    headers: &HeaderMap,
    body: Body,
    endpoint: Endpoint,
    prepare: fn(&PrepareContext, R) -> Result<Prepared, ApiError>,
) -> Response {
    let result = async {
        let req: R = read_request(&state, headers, body).await?;
        let ctx = state.prepare.clone();
        let prepared = blocking(move || prepare(&ctx, req)).await?;
        respond(&state, prepared, endpoint).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Reads a JSON request body of type `R` within the body limit (413 over it, 400 when it
/// does not parse).
pub(crate) async fn read_request<R: DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<R, ApiError> {
    check_declared_length(headers, state.body_limit)?;
    parse_body(body, state.body_limit).await
}

/// Queues a prepared request on the scheduler (429 when its queue is full) and returns the
/// channel its tokens and end come back on. Every API surface generates through this. With
/// `--shield`, the events pass the safety filter first (see [`crate::shield`]): the input
/// check runs while the job is already prefilling, and the reply is released as the checks
/// pass; `p.stream` picks windowed output checks over one check of the whole reply.
pub(crate) fn submit(
    state: &AppState,
    p: &mut Prepared,
) -> Result<mpsc::UnboundedReceiver<JobEvent>, ApiError> {
    let prompt_tokens = p.prompt.len();
    let shield = match (&state.shield, p.shield.take()) {
        (Some(filter), Some(request)) => Some((filter.clone(), request)),
        _ => None,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt: std::mem::take(&mut p.prompt),
        soft: std::mem::take(&mut p.soft),
        params: p.params.clone(),
        logprobs: p.logprobs,
        grammar: p.grammar.take(),
        events: tx,
        arrived: std::time::Instant::now(),
        deadline: deadline(state.request_timeout),
    };
    state.scheduler.submit(job).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::queue_full(),
        SubmitError::ShuttingDown => ApiError::unavailable("the server is shutting down"),
    })?;
    Metrics::add(&state.metrics.requests, 1);
    Ok(match shield {
        Some((filter, request)) => crate::shield::filter_events(
            filter,
            state.metrics.clone(),
            request,
            prompt_tokens,
            p.stream,
            rx,
        ),
        None => rx,
    })
}

pub(crate) fn too_large(limit: usize) -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        ..ApiError::bad_request(format!("the request body is larger than {limit} bytes"))
    }
}

/// Refuses a body whose declared `Content-Length` is over the limit before reading any of it,
/// so a client announcing a gigabyte gets its 413 at once instead of a stalled connection.
pub(crate) fn check_declared_length(headers: &HeaderMap, limit: usize) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => Err(too_large(limit)),
        _ => Ok(()),
    }
}

pub(crate) async fn parse_body<T: DeserializeOwned>(
    body: Body,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes: Bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large(limit))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))?
}

/// What the non-streaming writer and the streaming forwarder keep per request.
struct Reply {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    prepared_tools: Vec<crate::api::Tool>,
    tool_mode: ToolMode,
    rng: SplitMix64,
}

async fn respond(
    state: &AppState,
    mut p: Prepared,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let mut rx = submit(state, &mut p)?;
    let created = now_secs();
    let mut rng = SplitMix64::new(request_seed());
    let prefix = if endpoint == Endpoint::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let reply = Reply {
        endpoint,
        id: format!("{prefix}-{:016x}", rng.next_u64()),
        created,
        model: state.model_id.clone(),
        prepared_tools: p.tools,
        tool_mode: p.tool_mode,
        rng,
    };
    if p.stream {
        // With the safety filter, the first event waits for the input check: a failed check
        // is then still an error status, and a blocked request one chunk.
        let mut first = Vec::new();
        if state.shield.is_some() {
            match rx.recv().await {
                Some(JobEvent::Failed(message)) => return Err(failure(message)),
                None => return Err(ApiError::internal("the scheduler stopped")),
                Some(event) => first.push(event),
            }
            if let Some(blocked) = blocked_at_once(&reply, &mut first, &mut rx) {
                return Ok(blocked);
            }
        }
        let (out_tx, out_rx) = mpsc::channel::<Result<Event, Infallible>>(64);
        tokio::spawn(forward_stream(
            reply,
            first,
            rx,
            out_tx,
            p.include_usage,
            p.logprobs.is_some(),
        ));
        return Ok(Sse::new(ReceiverStream::new(out_rx)).into_response());
    }
    let mut text = String::new();
    let mut logprobs = Vec::new();
    loop {
        match rx.recv().await {
            Some(JobEvent::Token {
                text: piece,
                logprobs: lp,
            }) => {
                text.push_str(&piece);
                logprobs.extend(lp);
            }
            Some(JobEvent::Done { finish, usage, .. }) => {
                let want_logprobs = p.logprobs.is_some();
                return Ok(
                    Json(reply.into_full(text, logprobs, want_logprobs, finish, usage))
                        .into_response(),
                );
            }
            Some(JobEvent::Failed(message)) => return Err(failure(message)),
            None => return Err(ApiError::internal("the scheduler stopped")),
        }
    }
}

/// A streamed request the filter blocked before any of its reply passed (the block message
/// followed at once by the `content_filter` end): one chunk with the message and the finish
/// reason, then `[DONE]`.
fn blocked_at_once(
    reply: &Reply,
    first: &mut Vec<JobEvent>,
    rx: &mut mpsc::UnboundedReceiver<JobEvent>,
) -> Option<Response> {
    let Some(JobEvent::Token { text, .. }) = first.first() else {
        return None;
    };
    // The filter sends the message and the end together: the end is already queued.
    let next = rx.try_recv().ok()?;
    let blocked = matches!(
        next,
        JobEvent::Done {
            finish: FinishReason::ContentFilter,
            ..
        }
    );
    if !blocked {
        first.push(next);
        return None;
    }
    let mut delta = json!({"content": text});
    if reply.endpoint == Endpoint::Chat {
        delta["role"] = json!("assistant");
    }
    let chunk = reply.chunk(delta, Some(FinishReason::ContentFilter.as_str()), None);
    let events = [
        Ok::<_, Infallible>(Event::default().data(chunk.to_string())),
        Ok(Event::default().data("[DONE]")),
    ];
    Some(Sse::new(tokio_stream::iter(events)).into_response())
}

pub(crate) fn failure(message: String) -> ApiError {
    if message.contains("timed out") {
        ApiError::timeout()
    } else {
        ApiError::internal(message)
    }
}

impl Reply {
    fn into_full(
        mut self,
        text: String,
        logprobs: Vec<TokenLogprob>,
        want_logprobs: bool,
        finish: FinishReason,
        usage: Usage,
    ) -> Value {
        match self.endpoint {
            Endpoint::Completion => {
                let lp = want_logprobs.then(|| legacy_logprobs(&logprobs));
                let mut full = self.chunk(json!({"content": text}), Some(finish.as_str()), lp);
                full["usage"] = json!(usage);
                full
            }
            Endpoint::Chat => {
                let (message, finish) = self.chat_message(text, finish);
                json!({
                    "id": self.id,
                    "object": "chat.completion",
                    "created": self.created,
                    "model": self.model,
                    "choices": [{
                        "index": 0,
                        "message": message,
                        "logprobs": want_logprobs.then(|| json!({"content": logprobs})),
                        "finish_reason": finish,
                    }],
                    "usage": usage,
                })
            }
        }
    }

    /// The assistant message of a whole reply: text, or the calls found in it (with any
    /// text before them as content), parsed as the streaming path parses them.
    fn chat_message(&mut self, text: String, finish: FinishReason) -> (Value, &'static str) {
        let Some(parser) = self.call_parser() else {
            return (
                json!({"role": "assistant", "content": text}),
                finish.as_str(),
            );
        };
        let (content, calls) = parser.parse_all(&text);
        if calls.is_empty() {
            return (
                json!({"role": "assistant", "content": content}),
                finish.as_str(),
            );
        }
        let finish = calls_finish(&calls, finish);
        let calls: Vec<ToolCall> = calls
            .into_iter()
            .map(|c| ToolCall {
                id: self.call_id(),
                kind: "function".into(),
                function: FunctionCall {
                    name: c.name,
                    arguments: c.arguments,
                },
            })
            .collect();
        let content = (!content.is_empty()).then_some(content);
        (
            json!({"role": "assistant", "content": content, "tool_calls": calls}),
            finish,
        )
    }

    /// With tools on, a parser that tells calls from text.
    fn call_parser(&self) -> Option<CallParser> {
        (self.endpoint == Endpoint::Chat && self.tool_mode != ToolMode::Off).then(|| {
            CallParser::new(
                self.prepared_tools
                    .iter()
                    .map(|t| t.function.name.clone())
                    .collect(),
            )
        })
    }

    fn call_id(&mut self) -> String {
        format!("call_{:016x}", self.rng.next_u64())
    }

    fn chunk(&self, delta: Value, finish: Option<&str>, logprobs: Option<Value>) -> Value {
        match self.endpoint {
            Endpoint::Chat => json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            }),
            Endpoint::Completion => json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "text": delta.get("content").cloned().unwrap_or(json!("")),
                    "logprobs": logprobs,
                    "finish_reason": finish,
                }],
            }),
        }
    }

    /// The chunks for pieces of the reply. The first carries the log-probabilities gathered
    /// since the last chunk; empty text goes out only to carry them.
    fn event_chunks(
        &mut self,
        events: Vec<CallEvent>,
        logprobs: &mut Vec<TokenLogprob>,
        want_logprobs: bool,
    ) -> Vec<Value> {
        let mut chunks = Vec::new();
        for event in events {
            let delta = match event {
                CallEvent::Text(text) if text.is_empty() && logprobs.is_empty() => continue,
                CallEvent::Text(text) => json!({"content": text}),
                CallEvent::Start { index, name } => json!({"tool_calls": [{
                    "index": index, "id": self.call_id(), "type": "function",
                    "function": {"name": name, "arguments": ""},
                }]}),
                CallEvent::Arguments { index, fragment } => json!({"tool_calls": [{
                    "index": index, "function": {"arguments": fragment},
                }]}),
            };
            let lp = want_logprobs.then(|| match self.endpoint {
                Endpoint::Chat => json!({"content": logprobs}),
                Endpoint::Completion => legacy_logprobs(logprobs),
            });
            logprobs.clear();
            chunks.push(self.chunk(delta, None, lp));
        }
        chunks
    }
}

/// Turns scheduler events into SSE chunks. Ends (dropping the job, which frees its slot)
/// as soon as the client goes away.
async fn forward_stream(
    mut reply: Reply,
    first: Vec<JobEvent>,
    mut events: mpsc::UnboundedReceiver<JobEvent>,
    out: mpsc::Sender<Result<Event, Infallible>>,
    include_usage: bool,
    want_logprobs: bool,
) {
    let send = |value: Value| {
        let out = out.clone();
        async move {
            out.send(Ok(Event::default().data(value.to_string())))
                .await
                .is_ok()
        }
    };
    if reply.endpoint == Endpoint::Chat
        && !send(reply.chunk(json!({"role": "assistant", "content": ""}), None, None)).await
    {
        return;
    }
    // With tools on, the parser holds text that may start a call and turns calls into
    // tool_calls deltas as their arguments are generated.
    let mut parser = reply.call_parser();
    // Log-probabilities wait for the next chunk that goes out.
    let mut pending_logprobs: Vec<TokenLogprob> = Vec::new();
    // Events already taken off the channel (by the safety filter's wait) go first.
    let mut first = first.into_iter();
    loop {
        let event = match first.next() {
            Some(event) => Some(event),
            None => tokio::select! {
                event = events.recv() => event,
                _ = out.closed() => return,
            },
        };
        match event {
            Some(JobEvent::Token { text, logprobs }) => {
                pending_logprobs.extend(logprobs);
                let pieces = match &mut parser {
                    Some(parser) => parser.push(&text),
                    None => vec![CallEvent::Text(text)],
                };
                for chunk in reply.event_chunks(pieces, &mut pending_logprobs, want_logprobs) {
                    if !send(chunk).await {
                        return;
                    }
                }
            }
            Some(JobEvent::Done {
                finish: reason,
                usage,
                ..
            }) => {
                let mut finish = reason.as_str();
                let mut pieces = Vec::new();
                if let Some(parser) = &mut parser {
                    pieces = parser.finish();
                    if !parser.calls().is_empty() {
                        finish = calls_finish(parser.calls(), reason);
                    }
                }
                // Carries log-probabilities still waiting, if any.
                pieces.push(CallEvent::Text(String::new()));
                for chunk in reply.event_chunks(pieces, &mut pending_logprobs, want_logprobs) {
                    if !send(chunk).await {
                        return;
                    }
                }
                let delta = if reply.endpoint == Endpoint::Chat {
                    json!({})
                } else {
                    json!({"content": ""})
                };
                if !send(reply.chunk(delta, Some(finish), None)).await {
                    return;
                }
                if include_usage {
                    let mut last = reply.chunk(json!({}), None, None);
                    last["choices"] = json!([]);
                    last["usage"] = json!(usage);
                    if !send(last).await {
                        return;
                    }
                }
                let _ = out.send(Ok(Event::default().data("[DONE]"))).await;
                return;
            }
            Some(JobEvent::Failed(message)) => {
                let _ = send(failure(message).body()).await;
                let _ = out.send(Ok(Event::default().data("[DONE]"))).await;
                return;
            }
            None => return,
        }
    }
}

/// `tool_calls` when every call was closed; otherwise why generation ended (a call cut off
/// by `max_tokens` ends with `length`, as OpenAI's do).
fn calls_finish(calls: &[ParsedCall], finish: FinishReason) -> &'static str {
    if calls.iter().all(|c| c.complete) {
        "tool_calls"
    } else {
        finish.as_str()
    }
}

/// The `/v1/completions` logprobs shape.
fn legacy_logprobs(logprobs: &[TokenLogprob]) -> Value {
    let mut offset = 0;
    let mut offsets = Vec::new();
    for lp in logprobs {
        offsets.push(offset);
        offset += lp.token.len();
    }
    json!({
        "tokens": logprobs.iter().map(|l| &l.token).collect::<Vec<_>>(),
        "token_logprobs": logprobs.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": logprobs.iter().map(|l| {
            l.top_logprobs.iter().map(|t| (t.token.clone(), json!(t.logprob))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// A different seed per request for ids.
pub(crate) fn request_seed() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos
        ^ COUNTER
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .rotate_left(32)
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
