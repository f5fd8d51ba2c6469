//! Turning a parsed request into a scheduler job: validation, prompt rendering, tokenizing
//! and grammar compilation. Runs on a blocking thread (tokenizing and compiling schemas take
//! real CPU time).

use std::sync::Arc;
use std::time::{Duration, Instant};

use gemma_engine::gemma_tokenizer::ChatMessage;
use gemma_engine::{LoadedModel, SamplingParams};
use llguidance::Matcher;

use crate::api::{
    ChatCompletionRequest, CompletionRequest, MessageContent, PromptInput, ResponseFormat,
    SamplingFields, Tool,
};
use crate::constrain::GrammarCompiler;
use crate::error::ApiError;
use crate::tools::{self, ToolMode};

/// Everything the scheduler and the response writer need.
pub struct Prepared {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub logprobs: Option<usize>,
    pub grammar: Option<Matcher>,
    pub tools: Vec<Tool>,
    pub tool_mode: ToolMode,
    pub stream: bool,
    pub include_usage: bool,
}

/// Shared, read-only context for preparing requests.
pub struct PrepareContext {
    pub loaded: Arc<LoadedModel>,
    pub ctx_size: usize,
    pub grammar: std::sync::OnceLock<Result<GrammarCompiler, String>>,
    pub end_token: u32,
}

impl PrepareContext {
    fn compiler(&self) -> Result<&GrammarCompiler, ApiError> {
        self.grammar
            .get_or_init(|| {
                GrammarCompiler::new(self.loaded.clone(), self.end_token)
                    .map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| ApiError::internal(format!("constrained decoding is unavailable: {e}")))
    }

    pub fn chat(&self, req: ChatCompletionRequest) -> Result<Prepared, ApiError> {
        let tools = req.tools.unwrap_or_default();
        let tool_mode = tools::tool_mode(&tools, req.tool_choice.as_ref())?;
        let messages = chat_messages(&req.messages, &tools, &tool_mode)?;
        let rendered = self.loaded.render_chat(None, &messages).map_err(|e| {
            ApiError::bad_request(format!("cannot render the conversation: {e:#}"))
                .with_param("messages")
        })?;
        let prompt = self.tokenize(&rendered)?;
        let top_logprobs = req.top_logprobs.unwrap_or(0);
        if top_logprobs > 20 {
            return Err(
                ApiError::bad_request("top_logprobs must be at most 20").with_param("top_logprobs")
            );
        }
        let logprobs = req.logprobs.unwrap_or(false).then_some(top_logprobs);
        let grammar = match (&tool_mode, &req.response_format) {
            (ToolMode::Required(allowed), _) => {
                let schema = tools::call_schema(&tools, allowed);
                Some(self.compile(&schema, "tools")?)
            }
            (_, Some(ResponseFormat::JsonObject)) => Some(
                self.compiler()?
                    .json_object()
                    .map_err(|e| ApiError::internal(format!("{e:#}")))?,
            ),
            (_, Some(ResponseFormat::JsonSchema { json_schema })) => {
                let schema = json_schema.schema.clone().ok_or_else(|| {
                    ApiError::bad_request("response_format.json_schema.schema is missing")
                        .with_param("response_format")
                })?;
                Some(self.compile(&schema, "response_format")?)
            }
            _ => None,
        };
        let max_tokens = req.max_completion_tokens.or(req.sampling.max_tokens);
        let (params, stream, include_usage) =
            self.sampling(&req.sampling, max_tokens, prompt.len())?;
        Ok(Prepared {
            prompt,
            params,
            logprobs,
            grammar,
            tools,
            tool_mode,
            stream,
            include_usage,
        })
    }

    pub fn completion(&self, req: CompletionRequest) -> Result<Prepared, ApiError> {
        let text = match req.prompt {
            PromptInput::Text(t) => t,
            PromptInput::Texts(mut v) if v.len() == 1 => v.remove(0),
            PromptInput::Texts(_) => {
                return Err(
                    ApiError::bad_request("only one prompt per request is supported")
                        .with_param("prompt"),
                )
            }
        };
        if req.echo == Some(true) {
            return Err(ApiError::bad_request("echo is not supported").with_param("echo"));
        }
        let logprobs = req.logprobs;
        if logprobs.is_some_and(|n| n > 5) {
            return Err(ApiError::bad_request("logprobs must be at most 5").with_param("logprobs"));
        }
        let prompt = self.tokenize(&text)?;
        let (params, stream, include_usage) =
            self.sampling(&req.sampling, req.sampling.max_tokens, prompt.len())?;
        Ok(Prepared {
            prompt,
            params,
            logprobs,
            grammar: None,
            tools: Vec::new(),
            tool_mode: ToolMode::Off,
            stream,
            include_usage,
        })
    }

    fn compile(&self, schema: &serde_json::Value, param: &str) -> Result<Matcher, ApiError> {
        self.compiler()?.json_schema(schema).map_err(|e| {
            ApiError::bad_request(format!("unsupported JSON schema: {e:#}"))
                .with_param(param)
                .with_code("unsupported_schema")
        })
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        let prompt = self
            .loaded
            .encode_prompt(text)
            .map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e:#}")))?;
        if prompt.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty"));
        }
        if prompt.len() >= self.ctx_size {
            return Err(ApiError::bad_request(format!(
                "the prompt has {} tokens but the context size is {}; shorten it",
                prompt.len(),
                self.ctx_size
            ))
            .with_code("context_length_exceeded"));
        }
        Ok(prompt)
    }

    fn sampling(
        &self,
        f: &SamplingFields,
        max_tokens: Option<usize>,
        prompt_len: usize,
    ) -> Result<(SamplingParams, bool, bool), ApiError> {
        let defaults = SamplingParams::default();
        let checks = [
            (f.n.is_none_or(|n| n == 1), "n", "only n = 1 is supported"),
            (
                f.temperature.is_none_or(|t| (0.0..=2.0).contains(&t)),
                "temperature",
                "temperature must be between 0 and 2",
            ),
            (
                f.top_p.is_none_or(|p| p > 0.0 && p <= 1.0),
                "top_p",
                "top_p must be in (0, 1]",
            ),
            (
                f.min_p.is_none_or(|p| (0.0..=1.0).contains(&p)),
                "min_p",
                "min_p must be between 0 and 1",
            ),
            (
                f.presence_penalty.is_none_or(|p| (-2.0..=2.0).contains(&p)),
                "presence_penalty",
                "presence_penalty must be between -2 and 2",
            ),
            (
                f.frequency_penalty
                    .is_none_or(|p| (-2.0..=2.0).contains(&p)),
                "frequency_penalty",
                "frequency_penalty must be between -2 and 2",
            ),
            (
                f.repeat_penalty.is_none_or(|p| p > 0.0),
                "repeat_penalty",
                "repeat_penalty must be positive",
            ),
            (
                max_tokens.is_none_or(|m| m > 0),
                "max_tokens",
                "max_tokens must be at least 1",
            ),
        ];
        if let Some((_, param, message)) = checks.iter().find(|(ok, _, _)| !ok) {
            return Err(ApiError::bad_request(*message).with_param(param));
        }
        let room = self.ctx_size - prompt_len;
        let stop = f.stop.as_ref().map(|s| s.clone_vec()).unwrap_or_default();
        if stop.len() > 4 {
            return Err(
                ApiError::bad_request("at most 4 stop strings are allowed").with_param("stop")
            );
        }
        let params = SamplingParams {
            temperature: f.temperature.unwrap_or(defaults.temperature),
            top_k: f.top_k.unwrap_or(defaults.top_k),
            top_p: f.top_p.unwrap_or(defaults.top_p),
            min_p: f.min_p.unwrap_or(defaults.min_p),
            repeat_penalty: f.repeat_penalty.unwrap_or(1.0),
            repeat_last_n: defaults.repeat_last_n,
            frequency_penalty: f.frequency_penalty.unwrap_or(0.0),
            presence_penalty: f.presence_penalty.unwrap_or(0.0),
            seed: f.seed,
            max_tokens: max_tokens.unwrap_or(room).min(room),
            stop,
            truncate: false,
        };
        let stream = f.stream.unwrap_or(false);
        let include_usage = f.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Ok((params, stream, include_usage))
    }
}

/// The conversation as the chat template wants it: text only, tool calls and results written
/// out, `developer` as `system`, and consecutive turns of one side merged (Gemma's template
/// insists on alternation).
fn chat_messages(
    messages: &[crate::api::RequestMessage],
    tools: &[Tool],
    mode: &ToolMode,
) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").with_param("messages"));
    }
    let mut out: Vec<ChatMessage> = Vec::new();
    if *mode != ToolMode::Off {
        out.push(ChatMessage::new("system", tools::tools_preamble(tools)));
    }
    for (i, m) in messages.iter().enumerate() {
        let text = content_text(m.content.as_ref(), i)?;
        let (role, text) = match m.role.as_str() {
            "system" | "developer" => ("system", text),
            "user" => ("user", text),
            "assistant" => match &m.tool_calls {
                Some(calls) if !calls.is_empty() => {
                    let calls = tools::render_calls(calls);
                    (
                        "assistant",
                        if text.is_empty() {
                            calls
                        } else {
                            format!("{text}\n{calls}")
                        },
                    )
                }
                _ => ("assistant", text),
            },
            "tool" | "function" => ("user", tools::render_tool_result(m.name.as_deref(), &text)),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown role {other:?} in messages[{i}]"
                ))
                .with_param("messages"))
            }
        };
        match out.last_mut() {
            Some(last) if last.role == role => {
                last.content.push_str("\n\n");
                last.content.push_str(&text);
            }
            _ => out.push(ChatMessage::new(role, text)),
        }
    }
    // A system turn is folded into the first user turn by the template; it must be followed
    // by one.
    if out.len() == 1 && out[0].role == "system" {
        out.push(ChatMessage::new("user", ""));
    }
    Ok(out)
}

fn content_text(content: Option<&MessageContent>, index: usize) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(MessageContent::Text(t)) => Ok(t.clone()),
        Some(MessageContent::Parts(parts)) => {
            let mut text = String::new();
            for part in parts {
                match part.kind.as_str() {
                    "text" | "input_text" => text.push_str(part.text.as_deref().unwrap_or("")),
                    "image_url" | "input_image" | "input_audio" | "audio" | "image" | "file" => {
                        return Err(ApiError::bad_request(format!(
                            "messages[{index}] has a {:?} content part: this server handles text only for now \
                             (image and audio input are not supported yet)",
                            part.kind
                        ))
                        .with_param("messages")
                        .with_code("unsupported_content"))
                    }
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "messages[{index}] has an unknown content part type {other:?}"
                        ))
                        .with_param("messages"))
                    }
                }
            }
            Ok(text)
        }
    }
}

/// When a request must be answered by.
pub fn deadline(timeout: Duration) -> Instant {
    Instant::now() + timeout
}
