//! OpenAI's Responses API, `POST /v1/responses`: `input` (a string or a list of items:
//! messages with text and image parts, function calls and their outputs), `instructions`,
//! flat function `tools`, `text.format`, `max_output_tokens`, streaming as typed server-sent
//! events. A request is turned into the server's chat request ([`to_chat_request`], a pure
//! function, fuzzed), prepared and generated as a chat completion is; [`Builder`] turns the
//! reply into output items, the same way whether streamed or not.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gemma_engine::sampling::SplitMix64;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::{
    ChatCompletionRequest, ContentPart, FunctionCall, FunctionDef, ImageUrl, InputAudio,
    JsonSchemaSpec, MessageContent, NamedFunction, NamedToolChoice, RequestMessage, ResponseFormat,
    SamplingFields, Tool, ToolCall, ToolChoice, Usage,
};
use crate::error::ApiError;
use crate::routes::{blocking, failure, now_secs, read_request, request_seed, submit, AppState};
use crate::scheduler::{FinishReason, JobEvent, Timings};
use crate::tool_stream::{CallEvent, CallParser};
use crate::tools::ToolMode;

#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    #[serde(default)]
    pub model: Option<String>,
    /// A string, or a list of input items (checked by [`to_chat_request`]).
    #[serde(default)]
    pub input: Option<Value>,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub max_output_tokens: Option<usize>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub text: Option<TextConfig>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub metadata: Option<Value>,
    /// Refused: this server keeps no responses to continue from.
    #[serde(default)]
    pub previous_response_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct TextConfig {
    #[serde(default)]
    pub format: Option<Value>,
}

fn bad(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::bad_request(message).with_param(param)
}

fn str_field<'a>(item: &'a Value, key: &str, at: &str) -> Result<&'a str, ApiError> {
    item.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("{at}.{key} must be a string"), at))
}

/// A Responses request as the server's chat request.
pub fn to_chat_request(req: &ResponsesRequest) -> Result<ChatCompletionRequest, ApiError> {
    if req.previous_response_id.is_some() {
        return Err(bad(
            "previous_response_id is not supported: this server does not store responses; \
             send the conversation in input",
            "previous_response_id",
        ));
    }
    if req.max_output_tokens == Some(0) {
        return Err(bad(
            "max_output_tokens must be at least 1",
            "max_output_tokens",
        ));
    }
    let mut messages = Vec::new();
    if let Some(instructions) = &req.instructions {
        messages.push(message(
            "system",
            MessageContent::Text(instructions.clone()),
        ));
    }
    messages.extend(input_messages(req.input.as_ref())?);
    let tools = match &req.tools {
        Some(tools) => Some(
            tools
                .iter()
                .enumerate()
                .map(|(i, t)| tool(t, i))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => None,
    };
    let tool_choice = match &req.tool_choice {
        None | Some(Value::Null) => None,
        Some(Value::String(mode)) => Some(ToolChoice::Mode(mode.clone())),
        Some(choice @ Value::Object(_))
            if choice.get("type").and_then(Value::as_str) == Some("function") =>
        {
            let name = str_field(choice, "name", "tool_choice")?;
            Some(ToolChoice::Named(NamedToolChoice {
                kind: "function".into(),
                function: NamedFunction { name: name.into() },
            }))
        }
        Some(_) => {
            return Err(bad(
                "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \
                 \"function\", \"name\": ...}",
                "tool_choice",
            ))
        }
    };
    let response_format = match req.text.as_ref().and_then(|t| t.format.as_ref()) {
        None | Some(Value::Null) => None,
        Some(format) => match format.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => Some(ResponseFormat::JsonObject),
            Some("json_schema") => {
                let schema = format
                    .get("schema")
                    .filter(|s| s.is_object())
                    .ok_or_else(|| bad("text.format.schema must be an object", "text.format"))?;
                Some(ResponseFormat::JsonSchema {
                    json_schema: JsonSchemaSpec {
                        name: format.get("name").and_then(Value::as_str).map(Into::into),
                        schema: Some(schema.clone()),
                        strict: format.get("strict").and_then(Value::as_bool),
                    },
                })
            }
            _ => {
                return Err(bad(
                    "text.format.type must be \"text\", \"json_object\" or \"json_schema\"",
                    "text.format",
                ))
            }
        },
    };
    Ok(ChatCompletionRequest {
        model: req.model.clone(),
        messages,
        sampling: SamplingFields {
            temperature: req.temperature,
            top_p: req.top_p,
            max_tokens: req.max_output_tokens,
            ..SamplingFields::default()
        },
        max_completion_tokens: None,
        logprobs: None,
        top_logprobs: None,
        response_format,
        tools,
        tool_choice,
        pan_and_scan: None,
    })
}

fn message(role: &str, content: MessageContent) -> RequestMessage {
    RequestMessage {
        role: role.into(),
        content: Some(content),
        tool_calls: None,
        tool_call_id: None,
        name: None,
    }
}

/// `{"type": "function", "name", "description", "parameters", "strict"}`.
fn tool(t: &Value, i: usize) -> Result<Tool, ApiError> {
    let at = format!("tools[{i}]");
    let kind = t.get("type").and_then(Value::as_str).unwrap_or("");
    if kind != "function" {
        return Err(bad(
            format!("{at} has type {kind:?}: only \"function\" tools are supported"),
            "tools",
        ));
    }
    let name = str_field(t, "name", &at)?;
    let parameters = match t.get("parameters") {
        None | Some(Value::Null) => None,
        Some(p @ Value::Object(_)) => Some(p.clone()),
        Some(_) => return Err(bad(format!("{at}.parameters must be an object"), "tools")),
    };
    Ok(Tool {
        kind: "function".into(),
        function: FunctionDef {
            name: name.into(),
            description: t.get("description").and_then(Value::as_str).map(Into::into),
            parameters,
        },
    })
}

/// The conversation in `input`.
fn input_messages(input: Option<&Value>) -> Result<Vec<RequestMessage>, ApiError> {
    let items = match input {
        None | Some(Value::Null) => return Err(bad("input is required", "input")),
        Some(Value::String(text)) => {
            return Ok(vec![message("user", MessageContent::Text(text.clone()))])
        }
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(bad("input must not be empty", "input"))
        }
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(bad(
                "input must be a string or an array of input items",
                "input",
            ))
        }
    };
    // The names of the calls in the input, for their outputs.
    let mut call_names: Vec<(String, String)> = Vec::new();
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        if !item.is_object() {
            return Err(bad(format!("{at} must be an object"), "input"));
        }
        let kind = match item.get("type") {
            None | Some(Value::Null) => "message",
            Some(Value::String(kind)) => kind.as_str(),
            Some(_) => return Err(bad(format!("{at}.type must be a string"), "input")),
        };
        match kind {
            "message" => {
                let role = str_field(item, "role", &at)?;
                let content = match item.get("content") {
                    Some(Value::String(text)) => MessageContent::Text(text.clone()),
                    Some(Value::Array(parts)) => MessageContent::Parts(
                        parts
                            .iter()
                            .enumerate()
                            .map(|(j, p)| content_part(p, &format!("{at}.content[{j}]")))
                            .collect::<Result<_, _>>()?,
                    ),
                    _ => {
                        return Err(bad(
                            format!("{at}.content must be a string or an array of parts"),
                            "input",
                        ))
                    }
                };
                messages.push(message(role, content));
            }
            "function_call" => {
                let call_id = str_field(item, "call_id", &at)?;
                let name = str_field(item, "name", &at)?;
                let arguments = str_field(item, "arguments", &at)?;
                call_names.push((call_id.into(), name.into()));
                let mut m = message("assistant", MessageContent::Text(String::new()));
                m.tool_calls = Some(vec![ToolCall {
                    id: call_id.into(),
                    kind: "function".into(),
                    function: FunctionCall {
                        name: name.into(),
                        arguments: arguments.into(),
                    },
                }]);
                messages.push(m);
            }
            "function_call_output" => {
                let call_id = str_field(item, "call_id", &at)?;
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .collect(),
                    _ => return Err(bad(format!("{at}.output must be a string"), "input")),
                };
                let name = call_names
                    .iter()
                    .find(|(id, _)| id == call_id)
                    .map(|(_, name)| name.clone());
                let mut m = message("tool", MessageContent::Text(output));
                m.tool_call_id = Some(call_id.into());
                m.name = name;
                messages.push(m);
            }
            // Reasoning from another model's earlier turn: nothing for Gemma to read.
            "reasoning" => {}
            other => return Err(bad(format!("{at} has unsupported type {other:?}"), "input")),
        }
    }
    if messages.is_empty() {
        return Err(bad("input has no messages", "input"));
    }
    Ok(messages)
}

fn content_part(part: &Value, at: &str) -> Result<ContentPart, ApiError> {
    let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
    let text = |key: &str| -> Result<ContentPart, ApiError> {
        Ok(ContentPart {
            kind: "text".into(),
            text: Some(str_field(part, key, at)?.into()),
            image_url: None,
            input_audio: None,
        })
    };
    match kind {
        "input_text" | "output_text" | "text" => text("text"),
        "refusal" => text("refusal"),
        "input_image" => {
            let url = part
                .get("image_url")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    bad(
                        format!(
                            "{at}.image_url must be a data: URL (file_id images are not \
                             supported)"
                        ),
                        at,
                    )
                })?;
            Ok(ContentPart {
                kind: "image_url".into(),
                text: None,
                image_url: Some(ImageUrl::Url(url.into())),
                input_audio: None,
            })
        }
        // The same shape as in chat completions: `{"data": <base64>, "format": "wav"}`.
        "input_audio" => {
            let audio = part
                .get("input_audio")
                .cloned()
                .and_then(|v| serde_json::from_value::<InputAudio>(v).ok())
                .ok_or_else(|| {
                    bad(
                        format!(
                            "{at}.input_audio must be an object with base64 \"data\" and a \
                             \"format\""
                        ),
                        at,
                    )
                })?;
            Ok(ContentPart {
                kind: "input_audio".into(),
                text: None,
                image_url: None,
                input_audio: Some(audio),
            })
        }
        other => Err(bad(
            format!(
                "{at} has type {other:?}: this server takes input_text, input_image and \
                 input_audio parts"
            ),
            at,
        )
        .with_code("unsupported_content")),
    }
}

/// Renames the chat request's parameters in an error to the Responses ones.
fn responses_param(mut e: ApiError) -> ApiError {
    if let Some(param) = &e.param {
        let renamed = if let Some(rest) = param.strip_prefix("messages") {
            format!("input{rest}")
        } else {
            match param.as_str() {
                "response_format" => "text.format".into(),
                "max_tokens" => "max_output_tokens".into(),
                other => other.into(),
            }
        };
        e.param = Some(renamed);
    }
    e
}

/// What the response object repeats from the request.
struct Echo {
    model: String,
    instructions: Option<String>,
    max_output_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    tools: Vec<Value>,
    tool_choice: Value,
    text: Value,
    parallel_tool_calls: bool,
    metadata: Value,
}

impl Echo {
    fn new(req: &ResponsesRequest, model: &str) -> Echo {
        let tools = req
            .tools
            .iter()
            .flatten()
            .map(|t| {
                json!({
                    "type": "function",
                    "name": t.get("name").cloned().unwrap_or(Value::Null),
                    "description": t.get("description").cloned().unwrap_or(Value::Null),
                    "parameters": t.get("parameters").cloned().unwrap_or(Value::Null),
                    "strict": t.get("strict").cloned().unwrap_or(Value::Null),
                })
            })
            .collect();
        let format = req
            .text
            .as_ref()
            .and_then(|t| t.format.clone())
            .filter(|f| !f.is_null())
            .unwrap_or_else(|| json!({"type": "text"}));
        Echo {
            model: req.model.clone().unwrap_or_else(|| model.to_owned()),
            instructions: req.instructions.clone(),
            max_output_tokens: req.max_output_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            tools,
            tool_choice: req
                .tool_choice
                .clone()
                .filter(|c| !c.is_null())
                .unwrap_or_else(|| json!("auto")),
            text: json!({"format": format}),
            parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
            metadata: req.metadata.clone().unwrap_or_else(|| json!({})),
        }
    }
}

/// The output item being written.
enum Open {
    Message {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        /// Its index among the parser's calls.
        index: usize,
    },
}

/// Builds the output items from the reply's text and calls, recording the stream events
/// that say so; the non-streaming path builds the same items and drops the events.
pub struct Builder {
    id: String,
    created_at: u64,
    echo: Echo,
    rng: SplitMix64,
    sequence: u64,
    output: Vec<Value>,
    open: Option<Open>,
    /// Whitespace before any item: it opens no message on its own.
    pending_space: String,
    events: Vec<Value>,
}

impl Builder {
    fn new(echo: Echo) -> Builder {
        let mut rng = SplitMix64::new(request_seed());
        Builder {
            id: format!("resp_{:016x}{:016x}", rng.next_u64(), rng.next_u64()),
            created_at: now_secs(),
            echo,
            rng,
            sequence: 0,
            output: Vec::new(),
            open: None,
            pending_space: String::new(),
            events: Vec::new(),
        }
    }

    fn new_id(&mut self, prefix: &str) -> String {
        format!(
            "{prefix}_{:016x}{:016x}",
            self.rng.next_u64(),
            self.rng.next_u64()
        )
    }

    fn emit(&mut self, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        self.events.push(data);
    }

    fn output_index(&self) -> usize {
        self.output.len()
    }

    /// The response object.
    fn response(&self, status: &str, usage: Option<Value>, incomplete: Option<&str>) -> Value {
        let e = &self.echo;
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": incomplete.map(|reason| json!({"reason": reason})),
            "instructions": e.instructions,
            "max_output_tokens": e.max_output_tokens,
            "model": e.model,
            "output": self.output,
            "parallel_tool_calls": e.parallel_tool_calls,
            "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "store": false,
            "temperature": e.temperature.unwrap_or(1.0),
            "text": e.text,
            "tool_choice": e.tool_choice,
            "tools": e.tools,
            "top_p": e.top_p.unwrap_or(0.95),
            "truncation": "disabled",
            "usage": usage,
            "metadata": e.metadata,
        })
    }

    fn start(&mut self) {
        let response = self.response("in_progress", None, None);
        self.emit("response.created", json!({"response": response}));
        self.emit("response.in_progress", json!({"response": response}));
    }

    fn event(&mut self, event: CallEvent, parser: Option<&CallParser>) {
        match event {
            CallEvent::Text(text) => self.text(&text, parser),
            CallEvent::Start { index, name } => {
                self.close(parser, "completed");
                self.pending_space.clear();
                let id = self.new_id("fc");
                let call_id = self.new_id("call");
                let item = json!({
                    "type": "function_call", "id": id, "call_id": call_id, "name": name,
                    "arguments": "", "status": "in_progress",
                });
                let output_index = self.output_index();
                self.emit(
                    "response.output_item.added",
                    json!({"output_index": output_index, "item": item}),
                );
                self.open = Some(Open::Call {
                    id,
                    call_id,
                    name,
                    arguments: String::new(),
                    index,
                });
            }
            CallEvent::Arguments { fragment, .. } => {
                let output_index = self.output_index();
                if let Some(Open::Call { id, arguments, .. }) = &mut self.open {
                    arguments.push_str(&fragment);
                    let id = id.clone();
                    self.emit(
                        "response.function_call_arguments.delta",
                        json!({"item_id": id, "output_index": output_index, "delta": fragment}),
                    );
                }
            }
        }
    }

    fn text(&mut self, text: &str, parser: Option<&CallParser>) {
        if text.is_empty() {
            return;
        }
        if matches!(self.open, Some(Open::Call { .. })) {
            self.close(parser, "completed");
        }
        if self.open.is_none() {
            if text.trim().is_empty() {
                self.pending_space.push_str(text);
                return;
            }
            self.open_message();
        }
        let delta = std::mem::take(&mut self.pending_space) + text;
        self.delta(&delta);
    }

    fn open_message(&mut self) {
        let id = self.new_id("msg");
        let output_index = self.output_index();
        self.emit(
            "response.output_item.added",
            json!({"output_index": output_index, "item": {
                "type": "message", "id": id, "status": "in_progress", "role": "assistant",
                "content": [],
            }}),
        );
        self.emit(
            "response.content_part.added",
            json!({"item_id": id, "output_index": output_index, "content_index": 0,
                   "part": {"type": "output_text", "text": "", "annotations": []}}),
        );
        self.open = Some(Open::Message {
            id,
            text: String::new(),
        });
    }

    fn delta(&mut self, delta: &str) {
        let output_index = self.output_index();
        if let Some(Open::Message { id, text }) = &mut self.open {
            text.push_str(delta);
            let id = id.clone();
            self.emit(
                "response.output_text.delta",
                json!({"item_id": id, "output_index": output_index, "content_index": 0,
                       "delta": delta, "logprobs": []}),
            );
        }
    }

    /// Closes the open item with `status` (a call cut off before its end is incomplete).
    fn close(&mut self, parser: Option<&CallParser>, status: &str) {
        let output_index = self.output_index();
        let item = match self.open.take() {
            None => return,
            Some(Open::Message { id, text }) => {
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                self.emit(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": output_index, "content_index": 0,
                           "text": text, "logprobs": []}),
                );
                self.emit(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": output_index, "content_index": 0,
                           "part": part}),
                );
                json!({"type": "message", "id": id, "status": status, "role": "assistant",
                       "content": [part]})
            }
            Some(Open::Call {
                id,
                call_id,
                name,
                arguments,
                index,
            }) => {
                let complete = parser
                    .and_then(|p| p.calls().get(index))
                    .is_some_and(|c| c.complete);
                let status = if complete { "completed" } else { "incomplete" };
                self.emit(
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": output_index,
                           "arguments": arguments}),
                );
                json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
                       "arguments": arguments, "status": status})
            }
        };
        self.emit(
            "response.output_item.done",
            json!({"output_index": output_index, "item": item}),
        );
        self.output.push(item);
    }

    /// Ends the reply: closes what is open and records the final event.
    fn finish(
        &mut self,
        parser: Option<&CallParser>,
        finish: FinishReason,
        usage: Usage,
        timings: &Timings,
    ) -> Value {
        // OpenAI's reasons: the token limit, or the content filter (`--shield`).
        let reason = match finish {
            FinishReason::Length => Some("max_output_tokens"),
            FinishReason::ContentFilter => Some("content_filter"),
            FinishReason::Stop => None,
        };
        let incomplete = reason.is_some();
        if self.output.is_empty() && self.open.is_none() {
            self.open_message();
        }
        let status = if incomplete {
            "incomplete"
        } else {
            "completed"
        };
        self.close(parser, status);
        let usage = json!({
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {
                "cached_tokens": timings.cached_tokens,
                "cache_write_tokens": 0,
            },
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens,
        });
        let response = self.response(status, Some(usage), reason);
        let kind = if incomplete {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.emit(kind, json!({"response": response}));
        response
    }
}

/// `POST /v1/responses`.
pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let req: ResponsesRequest = read_request(&state, &headers, body).await?;
        let chat = to_chat_request(&req).map_err(responses_param)?;
        let stream = req.stream.unwrap_or(false);
        let echo = Echo::new(&req, &state.model_id);
        let ctx = state.prepare.clone();
        let mut prepared = blocking(move || ctx.chat(chat))
            .await
            .map_err(responses_param)?;
        let parser = (prepared.tool_mode != ToolMode::Off).then(|| {
            CallParser::new(
                prepared
                    .tools
                    .iter()
                    .map(|t| t.function.name.clone())
                    .collect(),
            )
        });
        // The safety filter checks a streamed reply window by window, a whole one at its end.
        prepared.stream = stream;
        let events = submit(&state, &mut prepared)?;
        let builder = Builder::new(echo);
        if stream {
            let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
            tokio::spawn(forward(builder, parser, events, tx));
            return Ok(Sse::new(ReceiverStream::new(rx)).into_response());
        }
        collect(builder, parser, events).await
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Feeds one piece of reply text through the parser (if any) into the builder.
fn feed(builder: &mut Builder, parser: &mut Option<CallParser>, text: String) {
    let events = match parser {
        Some(p) => p.push(&text),
        None => vec![CallEvent::Text(text)],
    };
    for event in events {
        builder.event(event, parser.as_ref());
    }
}

fn end(builder: &mut Builder, parser: &mut Option<CallParser>) {
    if let Some(p) = parser {
        for event in p.finish() {
            builder.event(event, parser.as_ref());
        }
    }
}

async fn collect(
    mut builder: Builder,
    mut parser: Option<CallParser>,
    mut events: mpsc::UnboundedReceiver<JobEvent>,
) -> Result<Response, ApiError> {
    loop {
        match events.recv().await {
            Some(JobEvent::Token { text, .. }) => {
                feed(&mut builder, &mut parser, text);
                builder.events.clear();
            }
            Some(JobEvent::Done {
                finish,
                usage,
                timings,
            }) => {
                end(&mut builder, &mut parser);
                let response = builder.finish(parser.as_ref(), finish, usage, &timings);
                return Ok(Json(response).into_response());
            }
            Some(JobEvent::Failed(message)) => return Err(failure(message)),
            None => return Err(ApiError::internal("the scheduler stopped")),
        }
    }
}

/// Writes the builder's events as server-sent events while tokens arrive; stops (freeing
/// the slot) when the client goes away.
async fn forward(
    mut builder: Builder,
    mut parser: Option<CallParser>,
    mut events: mpsc::UnboundedReceiver<JobEvent>,
    out: mpsc::Sender<Result<Event, Infallible>>,
) {
    async fn flush(builder: &mut Builder, out: &mpsc::Sender<Result<Event, Infallible>>) -> bool {
        for data in std::mem::take(&mut builder.events) {
            let kind = data["type"].as_str().unwrap_or("message").to_owned();
            let event = Event::default().event(kind).data(data.to_string());
            if out.send(Ok(event)).await.is_err() {
                return false;
            }
        }
        true
    }
    builder.start();
    if !flush(&mut builder, &out).await {
        return;
    }
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = out.closed() => return,
        };
        match event {
            Some(JobEvent::Token { text, .. }) => feed(&mut builder, &mut parser, text),
            Some(JobEvent::Done {
                finish,
                usage,
                timings,
            }) => {
                end(&mut builder, &mut parser);
                builder.finish(parser.as_ref(), finish, usage, &timings);
                flush(&mut builder, &out).await;
                return;
            }
            Some(JobEvent::Failed(message)) => {
                let error = failure(message);
                builder.emit(
                    "error",
                    json!({"code": error.code, "message": error.message, "param": null}),
                );
                flush(&mut builder, &out).await;
                return;
            }
            None => return,
        }
        if !flush(&mut builder, &out).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> ResponsesRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn items_become_messages() {
        let req = request(json!({
            "instructions": "be brief",
            "input": [
                {"role": "user", "content": [
                    {"type": "input_text", "text": "hi"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "42"},
            ],
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
            "text": {"format": {"type": "json_object"}},
        }));
        let chat = to_chat_request(&req).unwrap();
        assert_eq!(chat.messages.len(), 4);
        assert_eq!(chat.messages[0].role, "system");
        assert_eq!(chat.messages[3].name.as_deref(), Some("f"));
        assert!(matches!(chat.tool_choice, Some(ToolChoice::Named(_))));
        assert!(matches!(
            chat.response_format,
            Some(ResponseFormat::JsonObject)
        ));
        for bad in [
            json!({"input": 3}),
            json!({"input": []}),
            json!({"input": [{"type": "mystery"}]}),
            json!({"input": [{"role": "user", "content": [{"type": "input_file"}]}]}),
            json!({"input": "x", "tools": [{"type": "web_search"}]}),
            json!({"input": "x", "text": {"format": {"type": "json_schema"}}}),
        ] {
            assert!(to_chat_request(&request(bad.clone())).is_err(), "{bad}");
        }
    }

    #[test]
    fn builder_splits_text_and_calls() {
        let req = request(json!({"input": "x"}));
        let mut b = Builder::new(Echo::new(&req, "m"));
        let mut parser = Some(CallParser::new(vec!["f".into()]));
        feed(
            &mut b,
            &mut parser,
            "Sure.\n{\"name\": \"f\", \"parameters\": {\"a\": 1}}".into(),
        );
        end(&mut b, &mut parser);
        let timings = Timings {
            started: std::time::Instant::now(),
            first_token: None,
            finished: std::time::Instant::now(),
            cached_tokens: 0,
            generated: Vec::new(),
        };
        let r = b.finish(
            parser.as_ref(),
            FinishReason::Stop,
            Usage::new(3, 4),
            &timings,
        );
        assert_eq!(r["output"][0]["type"], "message");
        assert_eq!(r["output"][1]["type"], "function_call");
        assert_eq!(r["output"][1]["name"], "f");
        let args: Value =
            serde_json::from_str(r["output"][1]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"a": 1}));
        assert_eq!(r["usage"]["total_tokens"], 7);
        let seq: Vec<u64> = b
            .events
            .iter()
            .map(|e| e["sequence_number"].as_u64().unwrap())
            .collect();
        assert!(seq.windows(2).all(|w| w[1] == w[0] + 1));
    }
}
