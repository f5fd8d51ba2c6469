//! HTTP handlers: parse and validate on the async runtime, prepare on a blocking thread,
//! generate on the scheduler thread, and write JSON or server-sent events back.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gemma_engine::sampling::SplitMix64;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::{ChatCompletionRequest, CompletionRequest, TokenLogprob, Usage};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::prepare::{deadline, PrepareContext, Prepared};
use crate::scheduler::{FinishReason, Job, JobEvent, Scheduler, SubmitError};
use crate::tools::{self, ToolMode};

pub struct AppState {
    pub scheduler: Scheduler,
    pub prepare: Arc<PrepareContext>,
    pub metrics: Arc<Metrics>,
    pub model_id: String,
    pub body_limit: usize,
    pub request_timeout: Duration,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        // Browser-based clients (playgrounds, notebooks) call from other origins.
        .layer(tower_http::cors::CorsLayer::permissive())
        .with_state(state)
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

async fn chat_completions(State(state): State<Arc<AppState>>, body: Body) -> Response {
    let result = async {
        let req: ChatCompletionRequest = parse_body(body, state.body_limit).await?;
        let ctx = state.prepare.clone();
        let prepared = blocking(move || ctx.chat(req)).await?;
        respond(&state, prepared, Endpoint::Chat).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(state): State<Arc<AppState>>, body: Body) -> Response {
    let result = async {
        let req: CompletionRequest = parse_body(body, state.body_limit).await?;
        let ctx = state.prepare.clone();
        let prepared = blocking(move || ctx.completion(req)).await?;
        respond(&state, prepared, Endpoint::Completion).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn parse_body<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiError> {
    let bytes: Bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            ..ApiError::bad_request(format!("the request body is larger than {limit} bytes"))
        })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

async fn blocking<T: Send + 'static>(
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

async fn respond(state: &AppState, p: Prepared, endpoint: Endpoint) -> Result<Response, ApiError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt: p.prompt,
        params: p.params,
        logprobs: p.logprobs,
        grammar: p.grammar,
        events: tx,
        arrived: std::time::Instant::now(),
        deadline: deadline(state.request_timeout),
    };
    state.scheduler.submit(job).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::queue_full(),
        SubmitError::ShuttingDown => ApiError::unavailable("the server is shutting down"),
    })?;
    Metrics::add(&state.metrics.requests, 1);
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
        let (out_tx, out_rx) = mpsc::channel::<Result<Event, Infallible>>(64);
        tokio::spawn(forward_stream(
            reply,
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
            Some(JobEvent::Done { finish, usage }) => {
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

fn failure(message: String) -> ApiError {
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
            Endpoint::Completion => json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "text": text,
                    "logprobs": want_logprobs.then(|| legacy_logprobs(&logprobs)),
                    "finish_reason": finish.as_str(),
                }],
                "usage": usage,
            }),
            Endpoint::Chat => {
                let calls = self.find_calls(&text);
                let (message, finish) = match calls {
                    Some(calls) => (
                        json!({"role": "assistant", "content": null, "tool_calls": calls}),
                        "tool_calls",
                    ),
                    None => (
                        json!({"role": "assistant", "content": text}),
                        finish.as_str(),
                    ),
                };
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

    fn find_calls(&mut self, text: &str) -> Option<Vec<crate::api::ToolCall>> {
        if self.tool_mode == ToolMode::Off {
            return None;
        }
        tools::parse_calls(text, &self.prepared_tools, &mut self.rng)
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

    fn text_chunk(&self, text: &str, logprobs: &[TokenLogprob], want_logprobs: bool) -> Value {
        let lp = want_logprobs.then(|| match self.endpoint {
            Endpoint::Chat => json!({"content": logprobs}),
            Endpoint::Completion => legacy_logprobs(logprobs),
        });
        self.chunk(json!({"content": text}), None, lp)
    }
}

/// Turns scheduler events into SSE chunks. Ends (dropping the job, which frees its slot)
/// as soon as the client goes away.
async fn forward_stream(
    mut reply: Reply,
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
    // With tools on, text that may be a call is held until it is clearly not one.
    let mut held = String::new();
    let mut held_logprobs: Vec<TokenLogprob> = Vec::new();
    let mut holding = reply.tool_mode != ToolMode::Off;
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = out.closed() => return,
        };
        match event {
            Some(JobEvent::Token { text, logprobs }) => {
                held.push_str(&text);
                held_logprobs.extend(logprobs);
                if holding && tools::may_be_call(&held) {
                    continue;
                }
                holding = false;
                if held.is_empty() && held_logprobs.is_empty() {
                    continue;
                }
                let chunk = reply.text_chunk(&held, &held_logprobs, want_logprobs);
                held.clear();
                held_logprobs.clear();
                if !send(chunk).await {
                    return;
                }
            }
            Some(JobEvent::Done { finish, usage }) => {
                let mut finish = finish.as_str();
                if let Some(calls) = reply.find_calls(&held) {
                    let deltas: Vec<Value> = calls
                        .iter()
                        .enumerate()
                        .map(|(index, c)| json!({
                            "index": index,
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.function.name, "arguments": c.function.arguments},
                        }))
                        .collect();
                    if !send(reply.chunk(json!({"tool_calls": deltas}), None, None)).await {
                        return;
                    }
                    finish = "tool_calls";
                } else if (!held.is_empty() || !held_logprobs.is_empty())
                    && !send(reply.text_chunk(&held, &held_logprobs, want_logprobs)).await
                {
                    return;
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
fn request_seed() -> u64 {
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

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
