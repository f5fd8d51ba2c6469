//! Ollama's API on the same port and scheduler as the OpenAI one: `POST /api/chat` and
//! `/api/generate` (newline-delimited JSON streams by default), `GET /api/tags`, `/api/ps`,
//! `/api/version`, `POST /api/show`, and `GET`/`HEAD /`. A request is turned into the
//! server's own chat or completion request ([`to_chat_request`], [`to_generate_request`]:
//! pure functions, fuzzed), prepared and generated exactly as an OpenAI request is, and its
//! tokens are written in Ollama's shapes. Errors are `{"error": "..."}` with the status.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gemma_engine::gemma_formats::{MetaValue, ModelFile, TensorSource};
use gemma_engine::LoadedModel;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::api::{
    ChatCompletionRequest, CompletionRequest, ContentPart, FunctionCall, FunctionDef, ImageUrl,
    JsonSchemaSpec, MessageContent, PromptInput, RequestMessage, ResponseFormat, SamplingFields,
    StopInput, Tool, ToolCall, Usage,
};
use crate::error::ApiError;
use crate::routes::{blocking, failure, read_request, submit, AppState};
use crate::scheduler::{FinishReason, JobEvent, Timings};
use crate::tool_stream::{CallEvent, CallParser, ParsedCall};

/// What `/api/version` reports: an Ollama version whose API this server follows, so that
/// clients that check for features see a recent one.
pub const OLLAMA_VERSION: &str = "0.12.0";

/// `POST /api/chat`.
#[derive(Debug, Deserialize)]
pub struct OllamaChatRequest {
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub messages: Vec<OllamaMessage>,
    #[serde(default)]
    pub tools: Option<Vec<OllamaTool>>,
    #[serde(default)]
    pub format: Option<Value>,
    #[serde(default)]
    pub options: Option<Map<String, Value>>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// Accepted and ignored: the model stays loaded.
    #[serde(default)]
    pub keep_alive: Option<Value>,
    #[serde(default)]
    pub think: Option<Value>,
}

/// `POST /api/generate`.
#[derive(Debug, Deserialize)]
pub struct OllamaGenerateRequest {
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub template: Option<String>,
    /// Token ids returned as `context` by an earlier reply: the conversation so far.
    #[serde(default)]
    pub context: Option<Vec<i64>>,
    #[serde(default)]
    pub raw: Option<bool>,
    #[serde(default)]
    pub format: Option<Value>,
    #[serde(default)]
    pub options: Option<Map<String, Value>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub keep_alive: Option<Value>,
    #[serde(default)]
    pub images: Option<Vec<String>>,
    #[serde(default)]
    pub think: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct OllamaMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<String>,
    /// Base64 images (no `data:` prefix).
    #[serde(default)]
    pub images: Option<Vec<String>>,
    #[serde(default)]
    pub tool_calls: Option<Vec<OllamaToolCall>>,
    /// The tool a `tool` message answers.
    #[serde(default)]
    pub tool_name: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub thinking: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct OllamaToolCall {
    pub function: OllamaFunctionCall,
}

#[derive(Debug, Deserialize)]
pub struct OllamaFunctionCall {
    pub name: String,
    /// An object (Ollama's shape); a JSON string is tolerated.
    #[serde(default)]
    pub arguments: Value,
}

/// `{"type": "function", "function": {"name", "description", "parameters"}}`.
#[derive(Debug, Deserialize)]
pub struct OllamaTool {
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionDef,
}

fn function_type() -> String {
    "function".into()
}

/// `POST /api/show` (`name` is the older spelling of `model`).
#[derive(Debug, Deserialize)]
pub struct OllamaShowRequest {
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub name: String,
}

/// What a generate request becomes: a chat (the default template) or a raw completion, and
/// the `context` ids to put before it.
#[derive(Debug)]
pub enum GenerateRequest {
    /// An empty prompt: Ollama loads the model and answers `done_reason: "load"`.
    Load,
    Chat(ChatCompletionRequest, Vec<u32>),
    Raw(CompletionRequest, Vec<u32>),
}

/// Ollama's `options` as the server's sampling fields: known options are checked for their
/// type, unknown ones ignored (as Ollama does).
pub fn sampling_options(options: Option<&Map<String, Value>>) -> Result<SamplingFields, ApiError> {
    let mut f = SamplingFields::default();
    let Some(options) = options else {
        return Ok(f);
    };
    for (key, value) in options {
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            "temperature" => f.temperature = Some(float_option(key, value)?),
            "top_p" => f.top_p = Some(float_option(key, value)?),
            "min_p" => f.min_p = Some(float_option(key, value)?),
            "presence_penalty" => f.presence_penalty = Some(float_option(key, value)?),
            "frequency_penalty" => f.frequency_penalty = Some(float_option(key, value)?),
            "repeat_penalty" => f.repeat_penalty = Some(float_option(key, value)?),
            "top_k" => {
                let k = int_option(key, value)?;
                // 0 or less: no top-k cut.
                f.top_k = Some(if k <= 0 { 0 } else { k as usize });
            }
            // -1 (no limit) and -2 (fill the context) both stop at the context's end.
            "num_predict" => f.max_tokens = usize::try_from(int_option(key, value)?).ok(),
            "seed" => f.seed = u64::try_from(int_option(key, value)?).ok(),
            "repeat_last_n" => {
                let n = int_option(key, value)?;
                // -1: the whole context.
                f.repeat_last_n = Some(usize::try_from(n).unwrap_or(usize::MAX));
            }
            "stop" => {
                let stops = match value {
                    Value::String(s) => vec![s.clone()],
                    Value::Array(items) => items
                        .iter()
                        .map(|s| s.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| {
                            ApiError::bad_request("option \"stop\" must be an array of strings")
                        })?,
                    _ => {
                        return Err(ApiError::bad_request(
                            "option \"stop\" must be an array of strings",
                        ))
                    }
                };
                f.stop = Some(StopInput::Many(stops));
            }
            // The context is the server's (--ctx-size); the value is only checked.
            "num_ctx" => {
                int_option(key, value)?;
            }
            _ => {}
        }
    }
    Ok(f)
}

fn float_option(key: &str, value: &Value) -> Result<f32, ApiError> {
    value
        .as_f64()
        .filter(|v| v.is_finite())
        .map(|v| v as f32)
        .ok_or_else(|| ApiError::bad_request(format!("option {key:?} must be a number")))
}

/// An integer option; a JSON number with a fraction is truncated, as Ollama does.
fn int_option(key: &str, value: &Value) -> Result<i64, ApiError> {
    value
        .as_i64()
        .or_else(|| {
            value
                .as_f64()
                .filter(|v| v.is_finite() && v.abs() < 9.0e15)
                .map(|v| v.trunc() as i64)
        })
        .ok_or_else(|| ApiError::bad_request(format!("option {key:?} must be an integer")))
}

/// `format`: `"json"`, a JSON schema object, or nothing.
pub fn response_format(format: Option<&Value>) -> Result<Option<ResponseFormat>, ApiError> {
    match format {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => Ok(Some(ResponseFormat::JsonObject)),
        Some(schema @ Value::Object(_)) => Ok(Some(ResponseFormat::JsonSchema {
            json_schema: JsonSchemaSpec {
                name: None,
                schema: Some(schema.clone()),
                strict: Some(true),
            },
        })),
        Some(other) => Err(ApiError::bad_request(format!(
            "invalid format {other}: expected \"json\" or a JSON schema object"
        ))),
    }
}

/// `think`: Gemma 3 has no thinking mode, so asking for one is refused as Ollama refuses it
/// for models without the capability.
fn check_think(model: &str, think: Option<&Value>) -> Result<(), ApiError> {
    match think {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(()),
        Some(Value::Bool(true)) | Some(Value::String(_)) => Err(ApiError::bad_request(format!(
            "\"{model}\" does not support thinking"
        ))),
        Some(other) => Err(ApiError::bad_request(format!(
            "invalid think value {other}: expected a boolean or \"high\", \"medium\", \"low\""
        ))),
    }
}

/// A base64 image as the data URL the media layer reads (a `data:` URL is kept as is).
fn image_url(image: &str) -> String {
    if image.trim_start().starts_with("data:") {
        image.to_owned()
    } else {
        format!("data:application/octet-stream;base64,{image}")
    }
}

/// The images (first) and the text of a message as content parts.
fn content(text: String, images: Option<&Vec<String>>) -> MessageContent {
    match images {
        Some(images) if !images.is_empty() => {
            let mut parts: Vec<ContentPart> = images
                .iter()
                .map(|i| ContentPart {
                    kind: "image_url".into(),
                    text: None,
                    image_url: Some(ImageUrl::Url(image_url(i))),
                    input_audio: None,
                })
                .collect();
            parts.push(ContentPart {
                kind: "text".into(),
                text: Some(text),
                image_url: None,
                input_audio: None,
            });
            MessageContent::Parts(parts)
        }
        _ => MessageContent::Text(text),
    }
}

fn tools(tools: Option<Vec<OllamaTool>>) -> Option<Vec<Tool>> {
    tools.map(|tools| {
        tools
            .into_iter()
            .map(|t| Tool {
                kind: t.kind,
                function: t.function,
            })
            .collect()
    })
}

/// An `/api/chat` request as the server's chat request.
pub fn to_chat_request(req: OllamaChatRequest) -> Result<ChatCompletionRequest, ApiError> {
    check_think(&req.model, req.think.as_ref())?;
    let sampling = sampling_options(req.options.as_ref())?;
    let response_format = response_format(req.format.as_ref())?;
    let mut messages = Vec::with_capacity(req.messages.len());
    // Ollama's tool results carry no call id: each answers the earliest unanswered call of
    // the assistant turns before it (the one named by `tool_name`, when given).
    let mut unanswered: Vec<(String, String)> = Vec::new();
    for (i, m) in req.messages.into_iter().enumerate() {
        let tool_calls = match m.tool_calls {
            Some(calls) => Some(
                calls
                    .into_iter()
                    .enumerate()
                    .map(|(j, c)| {
                        let arguments = match c.function.arguments {
                            Value::Null => "{}".to_owned(),
                            Value::String(s) => s,
                            v @ Value::Object(_) => v.to_string(),
                            _ => {
                                return Err(ApiError::bad_request(format!(
                                    "messages[{i}].tool_calls[{j}].function.arguments must be \
                                     an object"
                                )))
                            }
                        };
                        Ok(ToolCall {
                            id: format!("call_{i}_{j}"),
                            kind: "function".into(),
                            function: FunctionCall {
                                name: c.function.name,
                                arguments,
                            },
                        })
                    })
                    .collect::<Result<Vec<_>, ApiError>>()?,
            ),
            None => None,
        };
        if let Some(calls) = &tool_calls {
            unanswered.extend(
                calls
                    .iter()
                    .map(|c| (c.id.clone(), c.function.name.clone())),
            );
        }
        let name = m.tool_name.or(m.name);
        let tool_call_id = if m.role == "tool" {
            let at = unanswered
                .iter()
                .position(|(_, called)| name.as_ref().is_none_or(|n| n == called))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "messages[{i}] is a tool result, but no earlier assistant message made \
                         {} tool call it could answer",
                        name.as_ref()
                            .map_or("a".to_string(), |n| format!("a {n:?}"))
                    ))
                })?;
            Some(unanswered.remove(at).0)
        } else {
            None
        };
        let text = m.content.unwrap_or_default();
        messages.push(RequestMessage {
            role: m.role,
            content: Some(content(text, m.images.as_ref())),
            tool_calls,
            tool_call_id,
            name,
        });
    }
    Ok(ChatCompletionRequest {
        model: Some(req.model),
        messages,
        sampling,
        max_completion_tokens: None,
        logprobs: None,
        top_logprobs: None,
        response_format,
        tools: tools(req.tools),
        tool_choice: None,
        pan_and_scan: None,
    })
}

/// An `/api/generate` request as the server's chat request (the model's template around
/// `system` and `prompt`) or, with `raw`, a completion of the prompt as it is.
pub fn to_generate_request(req: OllamaGenerateRequest) -> Result<GenerateRequest, ApiError> {
    check_think(&req.model, req.think.as_ref())?;
    if req.template.as_deref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::bad_request(
            "template is not supported: prompts use the model's own chat template (or send \
             raw: true with a formatted prompt)",
        ));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request(format!(
            "\"{}\" does not support insert (suffix)",
            req.model
        )));
    }
    let context = req
        .context
        .unwrap_or_default()
        .into_iter()
        .map(|id| u32::try_from(id).map_err(|_| ApiError::bad_request("invalid context token")))
        .collect::<Result<Vec<u32>, ApiError>>()?;
    let prompt = req.prompt.unwrap_or_default();
    let images = req.images.unwrap_or_default();
    if prompt.is_empty() && images.is_empty() && context.is_empty() {
        return Ok(GenerateRequest::Load);
    }
    let sampling = sampling_options(req.options.as_ref())?;
    let format = response_format(req.format.as_ref())?;
    if req.raw == Some(true) {
        if !images.is_empty() {
            return Err(ApiError::bad_request(
                "images need the chat template: send them without raw: true",
            ));
        }
        if format.is_some() {
            return Err(ApiError::bad_request(
                "format is not supported with raw: true",
            ));
        }
        let completion = CompletionRequest {
            model: Some(req.model),
            prompt: PromptInput::Text(prompt),
            sampling,
            logprobs: None,
            echo: None,
        };
        return Ok(GenerateRequest::Raw(completion, context));
    }
    let mut messages = Vec::new();
    if let Some(system) = req.system.filter(|s| !s.is_empty()) {
        messages.push(RequestMessage {
            role: "system".into(),
            content: Some(MessageContent::Text(system)),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        });
    }
    messages.push(RequestMessage {
        role: "user".into(),
        content: Some(content(prompt, Some(&images))),
        tool_calls: None,
        tool_call_id: None,
        name: None,
    });
    let chat = ChatCompletionRequest {
        model: Some(req.model),
        messages,
        sampling,
        max_completion_tokens: None,
        logprobs: None,
        top_logprobs: None,
        response_format: format,
        tools: None,
        tool_choice: None,
        pan_and_scan: None,
    };
    Ok(GenerateRequest::Chat(chat, context))
}

/// An error in Ollama's shape.
fn error_response(e: ApiError) -> Response {
    (e.status, Json(json!({"error": e.message}))).into_response()
}

/// The 404 Ollama answers for a model it does not have.
fn model_not_found(name: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        ..ApiError::bad_request(format!("model \"{name}\" not found, try pulling it first"))
    }
}

/// The served model's name as Ollama clients see it.
fn tagged_name(state: &AppState) -> String {
    format!("{}:latest", state.model_id)
}

/// Checks that `name` is the served model (with or without the `:latest` tag).
fn check_model(state: &AppState, name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::bad_request("model is required"));
    }
    let bare = name.strip_suffix(":latest").unwrap_or(name);
    if bare == state.model_id {
        Ok(())
    } else {
        Err(model_not_found(name))
    }
}

/// `POST /api/chat`.
pub async fn chat(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let received = Instant::now();
    let result = async {
        let req: OllamaChatRequest = read_request(&state, &headers, body).await?;
        check_model(&state, &req.model)?;
        let stream = req.stream.unwrap_or(true);
        let model = req.model.clone();
        let chat = to_chat_request(req)?;
        let ctx = state.prepare.clone();
        let mut prepared = blocking(move || ctx.chat(chat)).await?;
        let tool_names: Vec<String> = prepared
            .tools
            .iter()
            .map(|t| t.function.name.clone())
            .collect();
        let submitted = Instant::now();
        // The safety filter checks a streamed reply window by window, a whole one at its end.
        prepared.stream = stream;
        let events = submit(&state, &mut prepared)?;
        let reply = Reply {
            chat: true,
            model,
            received,
            submitted,
            parser: (prepared.tool_mode != crate::tools::ToolMode::Off)
                .then(|| CallParser::new(tool_names)),
            context: None,
        };
        Ok(reply.respond(events, stream).await)
    }
    .await;
    result.unwrap_or_else(error_response)
}

/// `POST /api/generate`.
pub async fn generate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received = Instant::now();
    let result = async {
        let req: OllamaGenerateRequest = read_request(&state, &headers, body).await?;
        check_model(&state, &req.model)?;
        let stream = req.stream.unwrap_or(true);
        let model = req.model.clone();
        let request = to_generate_request(req)?;
        let ctx = state.prepare.clone();
        let mut prepared = match request {
            GenerateRequest::Load => {
                let body = json!({
                    "model": model,
                    "created_at": rfc3339(SystemTime::now()),
                    "response": "",
                    "done": true,
                    "done_reason": "load",
                });
                return Ok(if stream {
                    ndjson_response(format!("{body}\n"))
                } else {
                    Json(body).into_response()
                });
            }
            GenerateRequest::Chat(chat, context) => {
                blocking(move || {
                    let p = ctx.chat(chat)?;
                    with_context(&ctx, p, &context)
                })
                .await?
            }
            GenerateRequest::Raw(completion, context) => {
                blocking(move || {
                    let p = ctx.completion(completion)?;
                    with_context(&ctx, p, &context)
                })
                .await?
            }
        };
        let prompt = prepared.prompt.clone();
        let submitted = Instant::now();
        prepared.stream = stream;
        let events = submit(&state, &mut prepared)?;
        let reply = Reply {
            chat: false,
            model,
            received,
            submitted,
            parser: None,
            context: Some(prompt),
        };
        Ok(reply.respond(events, stream).await)
    }
    .await;
    result.unwrap_or_else(error_response)
}

/// Puts the `context` ids of an earlier reply before a prepared prompt (whose own BOS is
/// dropped), checking the ids and that the whole still fits the context.
fn with_context(
    ctx: &crate::prepare::PrepareContext,
    mut p: crate::prepare::Prepared,
    context: &[u32],
) -> Result<crate::prepare::Prepared, ApiError> {
    if context.is_empty() {
        return Ok(p);
    }
    let vocab = ctx.loaded.model.vocab_size();
    if context.iter().any(|&id| id as usize >= vocab) {
        return Err(ApiError::bad_request(format!(
            "context holds a token id outside the vocabulary (0..{vocab})"
        )));
    }
    let bos = ctx.loaded.bos_id();
    let skip = usize::from(bos.is_some() && p.prompt.first().copied() == bos);
    let mut prompt = context.to_vec();
    prompt.extend_from_slice(&p.prompt[skip..]);
    if prompt.len() >= ctx.ctx_size {
        return Err(ApiError::bad_request(format!(
            "the prompt with its context has {} tokens but the context size is {}",
            prompt.len(),
            ctx.ctx_size
        )));
    }
    let shift = context.len() - skip;
    for span in &mut p.soft {
        span.start += shift;
    }
    p.params.max_tokens = p.params.max_tokens.min(ctx.ctx_size - prompt.len());
    p.prompt = prompt;
    Ok(p)
}

/// What a reply's writer keeps.
struct Reply {
    chat: bool,
    model: String,
    received: Instant,
    submitted: Instant,
    /// With tools on: tells calls from text.
    parser: Option<CallParser>,
    /// `/api/generate`: the prompt ids, returned with the generated ones as `context`.
    context: Option<Vec<u32>>,
}

impl Reply {
    async fn respond(self, events: mpsc::UnboundedReceiver<JobEvent>, stream: bool) -> Response {
        if stream {
            let (tx, rx) = mpsc::channel::<Result<Bytes, std::convert::Infallible>>(64);
            tokio::spawn(self.forward(events, tx));
            let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
            return ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response();
        }
        self.collect(events).await
    }

    /// One streamed piece.
    fn chunk(&self, content: &str, calls: Vec<Value>) -> Value {
        let mut chunk = json!({
            "model": self.model,
            "created_at": rfc3339(SystemTime::now()),
        });
        if self.chat {
            let mut message = json!({"role": "assistant", "content": content});
            if !calls.is_empty() {
                message["tool_calls"] = Value::Array(calls);
            }
            chunk["message"] = message;
        } else {
            chunk["response"] = json!(content);
        }
        chunk["done"] = json!(false);
        chunk
    }

    /// The final object: `done: true`, why, the counts and durations (nanoseconds).
    fn last(
        &self,
        content: &str,
        calls: Vec<Value>,
        finish: FinishReason,
        usage: Usage,
        timings: &Timings,
    ) -> Value {
        let mut last = self.chunk(content, calls);
        last["done"] = json!(true);
        last["done_reason"] = json!(finish.as_str());
        let nanos = |d: Duration| (d.as_nanos() as u64).max(1);
        let first = timings.first_token.unwrap_or(timings.finished);
        last["total_duration"] = json!(nanos(self.received.elapsed()));
        // No model is loaded per request: the time to read, check and prepare it
        // (tokenizing, images, grammar) stands in for Ollama's load time.
        last["load_duration"] = json!(nanos(self.submitted - self.received));
        last["prompt_eval_count"] = json!(usage.prompt_tokens);
        last["prompt_eval_duration"] =
            json!(nanos(first.saturating_duration_since(timings.started)));
        last["eval_count"] = json!(usage.completion_tokens);
        last["eval_duration"] = json!(nanos(timings.finished.saturating_duration_since(first)));
        if let Some(prompt) = &self.context {
            let mut context = prompt.clone();
            context.extend_from_slice(&timings.generated);
            last["context"] = json!(context);
        }
        last
    }

    async fn collect(mut self, mut events: mpsc::UnboundedReceiver<JobEvent>) -> Response {
        let mut text = String::new();
        loop {
            match events.recv().await {
                Some(JobEvent::Token { text: piece, .. }) => text.push_str(&piece),
                Some(JobEvent::Done {
                    finish,
                    usage,
                    timings,
                }) => {
                    let (content, calls) = match self.parser.take() {
                        Some(parser) => {
                            let (mut content, calls) = parser.parse_all(&text);
                            let (calls, leftover) = ollama_calls(calls);
                            content.push_str(&leftover);
                            (content, calls)
                        }
                        None => (text, Vec::new()),
                    };
                    return Json(self.last(&content, calls, finish, usage, &timings))
                        .into_response();
                }
                Some(JobEvent::Failed(message)) => return error_response(failure(message)),
                None => return error_response(ApiError::internal("the scheduler stopped")),
            }
        }
    }

    /// Writes one JSON object per line as tokens arrive; stops (freeing the slot) when the
    /// client goes away.
    async fn forward(
        mut self,
        mut events: mpsc::UnboundedReceiver<JobEvent>,
        out: mpsc::Sender<Result<Bytes, std::convert::Infallible>>,
    ) {
        let send = |value: Value| {
            let out = out.clone();
            async move {
                out.send(Ok(Bytes::from(format!("{value}\n"))))
                    .await
                    .is_ok()
            }
        };
        // Calls already sent (with tools on).
        let mut sent_calls = 0;
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                _ = out.closed() => return,
            };
            match event {
                Some(JobEvent::Token { text, .. }) => {
                    let (content, calls) = self.pieces(&text, &mut sent_calls, false);
                    if (!content.is_empty() || !calls.is_empty())
                        && !send(self.chunk(&content, calls)).await
                    {
                        return;
                    }
                }
                Some(JobEvent::Done {
                    finish,
                    usage,
                    timings,
                }) => {
                    let (content, calls) = self.pieces("", &mut sent_calls, true);
                    if (!content.is_empty() || !calls.is_empty())
                        && !send(self.chunk(&content, calls)).await
                    {
                        return;
                    }
                    let _ = send(self.last("", Vec::new(), finish, usage, &timings)).await;
                    return;
                }
                Some(JobEvent::Failed(message)) => {
                    let _ = send(json!({"error": failure(message).message})).await;
                    return;
                }
                None => return,
            }
        }
    }

    /// The text and the completed calls that `text` (and, at the `end`, whatever the parser
    /// still holds) make.
    fn pieces(&mut self, text: &str, sent_calls: &mut usize, end: bool) -> (String, Vec<Value>) {
        let Some(parser) = &mut self.parser else {
            return (text.to_owned(), Vec::new());
        };
        let mut events = parser.push(text);
        if end {
            events.extend(parser.finish());
        }
        let mut content = String::new();
        for event in events {
            if let CallEvent::Text(t) = event {
                content.push_str(&t);
            }
        }
        let calls = parser.calls();
        let mut done = Vec::new();
        while *sent_calls < calls.len() && (calls[*sent_calls].complete || end) {
            done.push(calls[*sent_calls].clone());
            *sent_calls += 1;
        }
        let (calls, leftover) = ollama_calls(done);
        content.push_str(&leftover);
        (content, calls)
    }
}

/// Calls in Ollama's shape (`arguments` an object). A call whose arguments are not a JSON
/// object (cut off by the token limit) goes back into the text as the model wrote it.
fn ollama_calls(calls: Vec<ParsedCall>) -> (Vec<Value>, String) {
    let mut out = Vec::new();
    let mut leftover = String::new();
    for c in calls {
        match serde_json::from_str::<Value>(&c.arguments) {
            Ok(arguments @ Value::Object(_)) if c.complete => {
                out.push(json!({"function": {"name": c.name, "arguments": arguments}}));
            }
            _ => leftover.push_str(&format!(
                "{{\"name\": {}, \"parameters\": {}",
                Value::String(c.name),
                c.arguments
            )),
        }
    }
    (out, leftover)
}

fn ndjson_response(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

/// `GET /` and `HEAD /`.
pub async fn root() -> &'static str {
    "Ollama is running"
}

/// `GET /api/version`.
pub async fn version() -> Json<Value> {
    Json(json!({"version": OLLAMA_VERSION}))
}

/// `GET /api/tags`: the one served model.
pub async fn tags(State(state): State<Arc<AppState>>) -> Response {
    match card(&state).await {
        Ok(card) => Json(json!({"models": [{
            "name": tagged_name(&state),
            "model": tagged_name(&state),
            "modified_at": card.modified_at,
            "size": card.size,
            "digest": card.digest,
            "details": card.details,
        }]}))
        .into_response(),
        Err(e) => error_response(e),
    }
}

/// `GET /api/ps`: the served model, loaded for good.
pub async fn ps(State(state): State<Arc<AppState>>) -> Response {
    match card(&state).await {
        Ok(card) => Json(json!({"models": [{
            "name": tagged_name(&state),
            "model": tagged_name(&state),
            "size": card.size,
            "digest": card.digest,
            "details": card.details,
            // The model is never unloaded.
            "expires_at": rfc3339(UNIX_EPOCH + Duration::from_secs(253_402_300_799)),
            "size_vram": 0,
            "context_length": state.prepare.ctx_size,
        }]}))
        .into_response(),
        Err(e) => error_response(e),
    }
}

/// `POST /api/show`.
pub async fn show(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let req: OllamaShowRequest = read_request(&state, &headers, body).await?;
        let name = if req.model.is_empty() {
            req.name
        } else {
            req.model
        };
        check_model(&state, &name)?;
        let card = card(&state).await?;
        let parameters = DEFAULT_PARAMETERS.join("\n");
        let modelfile = format!(
            "# Modelfile generated by gemma-rs\nFROM {}\nTEMPLATE \"\"\"{TEMPLATE}\"\"\"\n{}\n",
            state.prepare.loaded.source.display(),
            DEFAULT_PARAMETERS
                .iter()
                .map(|p| format!("PARAMETER {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let mut capabilities = vec!["completion", "tools"];
        if card.vision {
            capabilities.push("vision");
        }
        Ok(Json(json!({
            "modelfile": modelfile,
            "parameters": parameters,
            "template": TEMPLATE,
            "details": card.details,
            "model_info": card.model_info,
            "capabilities": capabilities,
            "modified_at": card.modified_at,
        }))
        .into_response())
    }
    .await;
    result.unwrap_or_else(error_response)
}

/// The sampling defaults, as Modelfile parameters.
const DEFAULT_PARAMETERS: &[&str] = &[
    "temperature 1",
    "top_k 64",
    "top_p 0.95",
    "stop \"<end_of_turn>\"",
];

/// Gemma 3's turn format as an Ollama (Go) template, for clients that show it; prompts are
/// rendered by the model's own chat template.
const TEMPLATE: &str = "{{- range .Messages }}<start_of_turn>\
{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n{{ .Content }}<end_of_turn>\n\
{{ end }}<start_of_turn>model\n";

/// What `/api/tags`, `/api/ps` and `/api/show` say about the model.
pub struct ModelCard {
    size: u64,
    digest: String,
    modified_at: String,
    details: Value,
    model_info: Value,
    vision: bool,
}

/// The card, computed once (hashing the model file) off the async runtime.
async fn card(state: &Arc<AppState>) -> Result<Arc<ModelCard>, ApiError> {
    if let Some(card) = state.card.get() {
        return Ok(card.clone());
    }
    let owner = state.clone();
    blocking(move || {
        let card = owner
            .card
            .get_or_init(|| Arc::new(model_card(&owner.prepare.loaded)))
            .clone();
        Ok(card)
    })
    .await
}

fn model_card(loaded: &LoadedModel) -> ModelCard {
    let architecture = loaded.model.architecture();
    let (size, digest, modified) = file_facts(&loaded.source);
    let mut parameters: u64 = 0;
    let mut bytes_by_type: std::collections::BTreeMap<&'static str, usize> = Default::default();
    for name in loaded.file.tensor_names() {
        if let Some(t) = loaded.file.tensor(&name) {
            parameters += t.n_elements() as u64;
            *bytes_by_type.entry(t.dtype.name()).or_default() += t.data.len();
        }
    }
    let quantization = match &loaded.file {
        ModelFile::Gguf(gguf) => gguf
            .get_u64("general.file_type")
            .ok()
            .flatten()
            .and_then(file_type_name)
            .map(str::to_owned),
        ModelFile::Hf(_) => None,
    }
    .or_else(|| {
        bytes_by_type
            .iter()
            .max_by_key(|(_, b)| **b)
            .map(|(t, _)| t.to_ascii_uppercase())
    })
    .unwrap_or_default();
    let details = json!({
        "parent_model": "",
        "format": match loaded.file { ModelFile::Gguf(_) => "gguf", ModelFile::Hf(_) => "safetensors" },
        "family": architecture,
        "families": [architecture],
        "parameter_size": parameter_size(parameters),
        "quantization_level": quantization,
    });
    let mut info = Map::new();
    if let ModelFile::Gguf(gguf) = &loaded.file {
        for (key, value) in gguf.metadata() {
            // Like Ollama without `verbose`: the tokenizer's long arrays are left out.
            // (The engine freed them after loading: `elided_len`.)
            let value = match value {
                MetaValue::Array(items) if items.len() > 64 => Value::Null,
                _ if gguf.elided_len(key).is_some() => Value::Null,
                v => meta_json(v),
            };
            info.insert(key.clone(), value);
        }
    }
    info.insert("general.architecture".into(), json!(architecture));
    info.insert("general.parameter_count".into(), json!(parameters));
    info.insert(
        format!("{architecture}.context_length"),
        json!(loaded.model.context_length()),
    );
    info.insert(
        format!("{architecture}.embedding_length"),
        json!(loaded.model.hidden_size()),
    );
    for (key, value) in loaded.model.describe() {
        let key = format!("{architecture}.{}", key.replace(' ', "_"));
        info.entry(key).or_insert_with(|| {
            value
                .parse::<f64>()
                .map(|v| json!(v))
                .unwrap_or(Value::String(value))
        });
    }
    ModelCard {
        size,
        digest,
        modified_at: rfc3339(modified),
        details,
        model_info: Value::Object(info),
        vision: loaded.vision.is_some(),
    }
}

/// Size, sha256 and modification time of a model file; for a folder, the total size of its
/// files and the hash of their names, sizes and `config.json`.
fn file_facts(path: &std::path::Path) -> (u64, String, SystemTime) {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(UNIX_EPOCH);
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .map(|d| d.filter_map(Result::ok).collect())
            .unwrap_or_default();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            size += len;
            hasher.update(e.file_name().to_string_lossy().as_bytes());
            hasher.update(len.to_le_bytes());
        }
        if let Ok(config) = std::fs::read(path.join("config.json")) {
            hasher.update(&config);
        }
    } else if let Ok(mut file) = std::fs::File::open(path) {
        let mut buffer = vec![0u8; 1 << 20];
        while let Ok(n) = file.read(&mut buffer) {
            if n == 0 {
                break;
            }
            size += n as u64;
            hasher.update(&buffer[..n]);
        }
    }
    let digest = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    (size, digest, modified)
}

/// llama.cpp's `general.file_type` names.
fn file_type_name(t: u64) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

/// "268M", "4.3B".
fn parameter_size(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.1}B", n as f64 / 1e9)
    } else {
        format!("{:.0}M", n as f64 / 1e6)
    }
}

fn meta_json(v: &MetaValue) -> Value {
    match v {
        MetaValue::U8(x) => json!(x),
        MetaValue::I8(x) => json!(x),
        MetaValue::U16(x) => json!(x),
        MetaValue::I16(x) => json!(x),
        MetaValue::U32(x) => json!(x),
        MetaValue::I32(x) => json!(x),
        MetaValue::U64(x) => json!(x),
        MetaValue::I64(x) => json!(x),
        MetaValue::F32(x) => json!(x),
        MetaValue::F64(x) => json!(x),
        MetaValue::Bool(x) => json!(x),
        MetaValue::String(x) => json!(x),
        MetaValue::Array(items) => Value::Array(items.iter().map(meta_json).collect()),
    }
}

/// RFC 3339 in UTC with nanoseconds, as Go's `time.RFC3339Nano` writes Ollama's timestamps
/// (but always nine digits).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_results_answer_the_earliest_unanswered_call() {
        let request = |messages: Value| -> OllamaChatRequest {
            serde_json::from_value(json!({"model": "gemma", "messages": messages})).unwrap()
        };
        let call = |name: &str| json!({"function": {"name": name, "arguments": {"city": "Oslo"}}});
        let chat = to_chat_request(request(json!([
            {"role": "user", "content": "weather and time in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather"), call("get_time")]},
            {"role": "tool", "content": "12:00", "tool_name": "get_time"},
            {"role": "tool", "content": "sunny"},
        ])))
        .unwrap();
        let calls = chat.messages[1].tool_calls.as_ref().unwrap();
        assert_eq!(
            chat.messages[2].tool_call_id.as_deref(),
            Some(calls[1].id.as_str())
        );
        assert_eq!(
            chat.messages[3].tool_call_id.as_deref(),
            Some(calls[0].id.as_str())
        );
        assert_eq!(chat.messages[3].name.as_deref(), None);
        let orphan = to_chat_request(request(json!([
            {"role": "user", "content": "hi"},
            {"role": "tool", "content": "sunny"},
        ])));
        assert!(orphan
            .unwrap_err()
            .message
            .contains("no earlier assistant message"));
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_709_251_199, 5);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.000000005Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000000000Z");
    }

    #[test]
    fn options_are_typed_and_unknown_ones_ignored() {
        let options: Map<String, Value> = serde_json::from_value(json!({
            "temperature": 0, "top_k": 5, "num_predict": -1, "seed": 42.0,
            "stop": ["a", "b"], "repeat_last_n": -1, "mirostat": 2, "num_ctx": 2048,
        }))
        .unwrap();
        let f = sampling_options(Some(&options)).unwrap();
        assert_eq!(f.temperature, Some(0.0));
        assert_eq!(f.top_k, Some(5));
        assert_eq!(f.max_tokens, None);
        assert_eq!(f.seed, Some(42));
        assert_eq!(f.repeat_last_n, Some(usize::MAX));
        assert!(matches!(f.stop, Some(StopInput::Many(ref s)) if s == &["a", "b"]));
        for bad in [
            json!({"temperature": "hot"}),
            json!({"stop": [1]}),
            json!({"num_predict": "x"}),
        ] {
            let options: Map<String, Value> = serde_json::from_value(bad).unwrap();
            assert_eq!(
                sampling_options(Some(&options)).unwrap_err().status,
                StatusCode::BAD_REQUEST
            );
        }
    }

    #[test]
    fn chat_messages_carry_images_and_calls() {
        let req: OllamaChatRequest = serde_json::from_value(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "look", "images": ["AAAA"]},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "f", "arguments": {"x": 1}}}]},
                {"role": "tool", "content": "2", "tool_name": "f"},
            ],
            "format": "json",
        }))
        .unwrap();
        let chat = to_chat_request(req).unwrap();
        let Some(MessageContent::Parts(parts)) = &chat.messages[0].content else {
            panic!("images make parts");
        };
        assert_eq!(
            parts[0].image_url.as_ref().unwrap().url(),
            "data:application/octet-stream;base64,AAAA"
        );
        assert_eq!(parts[1].text.as_deref(), Some("look"));
        let calls = chat.messages[1].tool_calls.as_ref().unwrap();
        assert_eq!(calls[0].function.arguments, r#"{"x":1}"#);
        assert_eq!(chat.messages[2].name.as_deref(), Some("f"));
        assert!(matches!(
            chat.response_format,
            Some(ResponseFormat::JsonObject)
        ));
        let bad: OllamaChatRequest =
            serde_json::from_value(json!({"model": "m", "messages": [], "format": 3})).unwrap();
        assert!(to_chat_request(bad).is_err());
    }
}
