//! Turning a parsed request into a scheduler job: validation, prompt rendering, tokenizing
//! and grammar compilation. Runs on a blocking thread (tokenizing and compiling schemas take
//! real CPU time).

use std::sync::Arc;
use std::time::{Duration, Instant};

use gemma_engine::audio::AUDIO_MARKER;
use gemma_engine::gemma_tokenizer::ChatMessage;
use gemma_engine::vision::IMAGE_MARKER;
use gemma_engine::{LoadedModel, PreparedAudio, SamplingParams, SoftSpan};
use llguidance::Matcher;

use crate::api::{
    ChatCompletionRequest, CompletionRequest, MessageContent, PromptInput, ResponseFormat,
    SamplingFields, Tool,
};
use crate::constrain::GrammarCompiler;
use crate::error::ApiError;
use crate::media::{self, AudioRef, ImageRef, MediaConfig};
use crate::shield::ShieldRequest;
use crate::tools::{self, ToolMode};

/// Everything the scheduler and the response writer need.
pub struct Prepared {
    pub prompt: Vec<u32>,
    /// Image and audio soft tokens placed on `prompt` (positions in it), in order.
    pub soft: Vec<SoftSpan>,
    pub params: SamplingParams,
    pub logprobs: Option<usize>,
    pub grammar: Option<Matcher>,
    pub tools: Vec<Tool>,
    pub tool_mode: ToolMode,
    pub stream: bool,
    pub include_usage: bool,
    /// What the safety filter checks before generation (`None` without `--shield`).
    pub shield: Option<ShieldRequest>,
}

/// Shared, read-only context for preparing requests.
pub struct PrepareContext {
    pub loaded: Arc<LoadedModel>,
    pub ctx_size: usize,
    pub grammar: std::sync::OnceLock<Result<GrammarCompiler, String>>,
    pub end_token: u32,
    pub media: MediaConfig,
    /// Held while a request's images or audio are decoded and encoded: one request at a time,
    /// so that concurrent media requests cannot multiply the decoders' and towers' memory.
    pub media_work: std::sync::Mutex<()>,
    /// `Some(with_images)` when the safety filter is on: requests carry their user text (and,
    /// with an image classifier, their images' bytes) for it.
    pub shield: Option<bool>,
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
        tools::check_parameters(&tools).map_err(|e| unsupported_schema(e, "tools"))?;
        let reserved = self.reserved_texts();
        let (messages, refs) = chat_messages(&req.messages, &tools, &tool_mode, &reserved)?;
        let rendered = self.loaded.render_chat(None, &messages).map_err(|e| {
            ApiError::bad_request(format!("cannot render the conversation: {e:#}"))
                .with_param("messages")
        })?;
        let (prompt, soft) = if refs.images.is_empty() && refs.audio.is_empty() {
            (self.tokenize(&rendered)?, Vec::new())
        } else {
            self.tokenize_with_media(&rendered, &refs, req.pan_and_scan.unwrap_or(false))?
        };
        let top_logprobs = req.top_logprobs.unwrap_or(0);
        if top_logprobs > 20 {
            return Err(
                ApiError::bad_request("top_logprobs must be at most 20").with_param("top_logprobs")
            );
        }
        let logprobs = req.logprobs.unwrap_or(false).then_some(top_logprobs);
        let grammar = match (&tool_mode, &req.response_format) {
            (ToolMode::Required(allowed), _) => Some(self.compile_tools(&tools, allowed)?),
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
        let shield = match self.shield {
            Some(with_images) => Some(ShieldRequest {
                text: last_user_text(&req.messages),
                images: if with_images {
                    refs.images
                        .iter()
                        .map(|r| media::image_bytes(&self.media, &r.url))
                        .collect::<Result<_, _>>()?
                } else {
                    Vec::new()
                },
            }),
            None => None,
        };
        Ok(Prepared {
            prompt,
            soft,
            params,
            logprobs,
            grammar,
            tools,
            tool_mode,
            stream,
            include_usage,
            shield,
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
            soft: Vec::new(),
            params,
            logprobs,
            grammar: None,
            tools: Vec::new(),
            tool_mode: ToolMode::Off,
            stream,
            include_usage,
            shield: self.shield.map(|_| ShieldRequest {
                text,
                images: Vec::new(),
            }),
        })
    }

    fn compile(&self, schema: &serde_json::Value, param: &str) -> Result<Matcher, ApiError> {
        self.compiler()?
            .json_schema(schema)
            .map_err(|e| unsupported_schema(format!("{e:#}"), param))
    }

    /// The grammar of a required call to one of `allowed`. A schema llguidance refuses is
    /// compiled again tool by tool to name the culprit.
    fn compile_tools(&self, tools: &[Tool], allowed: &[String]) -> Result<Matcher, ApiError> {
        let schema =
            tools::call_schema(tools, allowed).map_err(|e| unsupported_schema(e, "tools"))?;
        let compiler = self.compiler()?;
        compiler.compile(schema).map_err(|e| {
            let mut candidates = tools.iter().enumerate();
            let culprit = candidates.find_map(|(i, tool)| {
                if !allowed.contains(&tool.function.name) {
                    return None;
                }
                let name = std::slice::from_ref(&tool.function.name);
                let alone = tools::call_schema(std::slice::from_ref(tool), name).ok()?;
                let error = compiler.compile(alone).err()?;
                Some(format!("tools[{i}] ({}): {error:#}", tool.function.name))
            });
            unsupported_schema(culprit.unwrap_or_else(|| format!("{e:#}")), "tools")
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

    /// Texts that only media may put in a prompt, with what they stand for: for a model that
    /// takes images, the image marker and the soft-token placeholder; for one that takes audio,
    /// the audio marker (which is its soft-token placeholder too).
    pub(crate) fn reserved_texts(&self) -> Vec<(String, &'static str)> {
        let mut texts = Vec::new();
        if let Some(vision) = &self.loaded.vision {
            texts.push((IMAGE_MARKER.to_owned(), "an image"));
            let placeholder = self.loaded.token_text(vision.ids.image);
            if !placeholder.is_empty() {
                texts.push((placeholder, "an image"));
            }
        }
        if let Some(hearing) = &self.loaded.audio {
            texts.push((AUDIO_MARKER.to_owned(), "audio"));
            let placeholder = self.loaded.token_text(hearing.config.audio_token_id);
            if !placeholder.is_empty() && placeholder != AUDIO_MARKER {
                texts.push((placeholder, "audio"));
            }
        }
        texts
    }

    /// Reads and encodes the images and audio clips (the towers run here, on the preparing
    /// thread) and tokenizes the prompt with each marker expanded to its tokens.
    fn tokenize_with_media(
        &self,
        rendered: &str,
        refs: &MediaRefs,
        pan_and_scan: bool,
    ) -> Result<(Vec<u32>, Vec<SoftSpan>), ApiError> {
        let _busy = self.media_work.lock().unwrap_or_else(|e| e.into_inner());
        let images = media::prepare_images(&self.loaded, &self.media, &refs.images, pan_and_scan)?;
        let audio = media::prepare_audio(&self.loaded, &self.media, &refs.audio)?;
        for (marker, what, n) in [
            (IMAGE_MARKER, "image", images.len()),
            (AUDIO_MARKER, "audio", audio.len()),
        ] {
            let markers = rendered.matches(marker).count();
            if markers != n {
                // The chat template wrote markers of its own, or dropped a message.
                return Err(ApiError::bad_request(format!(
                    "the rendered conversation has {markers} {what} slot(s) for {n} {what} \
                     part(s): the chat template does not place every one"
                ))
                .with_param("messages"));
            }
        }
        self.encode_media(rendered, &images, &audio, "messages")
    }

    /// Tokenizes `rendered` with its markers expanded, refusing a prompt that does not fit
    /// before the towers run, then places the media's soft tokens (running the towers).
    pub(crate) fn encode_media(
        &self,
        rendered: &str,
        images: &[gemma_engine::PreparedImage],
        audio: &[PreparedAudio],
        param: &str,
    ) -> Result<(Vec<u32>, Vec<SoftSpan>), ApiError> {
        let mut expanded = std::borrow::Cow::Borrowed(rendered);
        let mut image_id = 0;
        if !images.is_empty() {
            let vision = self
                .loaded
                .vision()
                .map_err(|e| ApiError::internal(format!("{e:#}")))?;
            expanded = vision
                .expand_markers(&self.loaded.file, &expanded, images)
                .map_err(|e| ApiError::internal(format!("cannot place the images: {e:#}")))?
                .into();
            image_id = vision.ids.image;
        }
        if !audio.is_empty() {
            let hearing = self
                .loaded
                .hearing()
                .map_err(|e| ApiError::internal(format!("{e:#}")))?;
            expanded = hearing
                .expand_markers(&expanded, audio)
                .map_err(|e| ApiError::internal(format!("cannot place the audio: {e:#}")))?
                .into();
        }
        let ids = self
            .loaded
            .encode_prompt(&expanded)
            .map_err(|e| ApiError::bad_request(format!("cannot tokenize the prompt: {e:#}")))?;
        if ids.len() >= self.ctx_size {
            let mut parts = Vec::new();
            if !images.is_empty() {
                let n = ids.iter().filter(|&&id| id == image_id).count();
                let views: usize = images.iter().map(|i| i.views.len()).sum();
                parts.push(format!("{n} for {views} image view(s)"));
            }
            if !audio.is_empty() {
                let windows: usize = audio.iter().map(|a| a.windows.len()).sum();
                let seconds: f64 = audio.iter().map(|a| a.seconds).sum();
                parts.push(format!(
                    "at least {} for {seconds:.1} s of audio ({windows} window(s) of up to 30 s)",
                    windows
                        * self
                            .loaded
                            .hearing()
                            .map_or(0, |h| h.config.soft_tokens_per_clip)
                ));
            }
            return Err(ApiError::bad_request(format!(
                "the prompt has {} tokens, {}, but the context size is {}; send less media (or \
                 no pan-and-scan), or shorten the text",
                ids.len(),
                parts.join(" and "),
                self.ctx_size
            ))
            .with_param(param)
            .with_code("context_length_exceeded"));
        }
        self.loaded
            .encode_with_media(rendered, images, audio, false)
            .map_err(|e| ApiError::internal(format!("cannot place the media: {e:#}")))
    }

    pub(crate) fn sampling(
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
        let logit_bias = match &f.logit_bias {
            Some(map) => logit_bias(map, self.loaded.model.vocab_size())?,
            None => Vec::new(),
        };
        let params = SamplingParams {
            logit_bias,
            temperature: f.temperature.unwrap_or(defaults.temperature),
            top_k: f.top_k.unwrap_or(defaults.top_k),
            top_p: f.top_p.unwrap_or(defaults.top_p),
            min_p: f.min_p.unwrap_or(defaults.min_p),
            repeat_penalty: f.repeat_penalty.unwrap_or(1.0),
            repeat_last_n: f.repeat_last_n.unwrap_or(defaults.repeat_last_n),
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

/// OpenAI's `logit_bias`: keys are token ids written as decimal strings, values numbers in
/// [-100, 100]. Anything else is the client's mistake and is named, not ignored.
fn logit_bias(
    map: &serde_json::Map<String, serde_json::Value>,
    vocab_size: usize,
) -> Result<Vec<(u32, f32)>, ApiError> {
    const MAX_ENTRIES: usize = 1024;
    if map.len() > MAX_ENTRIES {
        return Err(ApiError::bad_request(format!(
            "logit_bias has {} entries; at most {MAX_ENTRIES} are allowed",
            map.len()
        ))
        .with_param("logit_bias"));
    }
    map.iter()
        .map(|(key, value)| {
            let id = key
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < vocab_size)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "logit_bias key {key:?} is not a token id of this model (a decimal \
                         integer below {vocab_size})"
                    ))
                    .with_param("logit_bias")
                })?;
            let bias = value
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "logit_bias[{key:?}] must be a number between -100 and 100, not {value}"
                    ))
                    .with_param("logit_bias")
                })?;
            Ok((id, bias as f32))
        })
        .collect()
}

/// The text of the last user message (its text parts, joined as the prompt joins them): what
/// the safety filter checks, and the prompt its response checks quote.
fn last_user_text(messages: &[crate::api::RequestMessage]) -> String {
    let Some(m) = messages.iter().rev().find(|m| m.role == "user") else {
        return String::new();
    };
    match &m.content {
        None => String::new(),
        Some(MessageContent::Text(t)) => t.clone(),
        Some(MessageContent::Parts(parts)) => parts
            .iter()
            .filter(|p| matches!(p.kind.as_str(), "text" | "input_text"))
            .filter_map(|p| p.text.as_deref())
            .collect(),
    }
}

/// The media parts of a conversation, each list in the order of its markers.
#[derive(Debug, Default)]
struct MediaRefs {
    images: Vec<ImageRef>,
    audio: Vec<AudioRef>,
}

/// The conversation as the chat template wants it: text with an [`IMAGE_MARKER`] where each
/// image part was and an [`AUDIO_MARKER`] where each audio part was, tool calls and results
/// written out, `developer` as `system`, and consecutive turns of one side merged (Gemma's
/// template insists on alternation). Also the media parts, in the order of their markers.
/// `reserved`: texts that may not appear in a message (the media tokens of the model).
fn chat_messages(
    messages: &[crate::api::RequestMessage],
    tools: &[Tool],
    mode: &ToolMode,
    reserved: &[(String, &str)],
) -> Result<(Vec<ChatMessage>, MediaRefs), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty").with_param("messages"));
    }
    let mut out: Vec<ChatMessage> = Vec::new();
    let mut media = MediaRefs::default();
    if *mode != ToolMode::Off {
        out.push(ChatMessage::new("system", tools::tools_preamble(tools)));
    }
    // The calls earlier assistant turns made: a `tool` message answers one of them.
    let mut calls_made: Vec<(&str, &str)> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let before = (media.images.len(), media.audio.len());
        let text = content_text(m.content.as_ref(), i, reserved, &mut media)?;
        if m.role != "user" {
            let what = if media.images.len() > before.0 {
                Some(("an image", "images", &media.images[before.0].param))
            } else if media.audio.len() > before.1 {
                Some(("audio", "audio parts", &media.audio[before.1].param))
            } else {
                None
            };
            if let Some((one, many, param)) = what {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}] is a {:?} message with {one}: {many} go in user messages",
                    m.role
                ))
                .with_param(param));
            }
        }
        let (role, text) = match m.role.as_str() {
            "system" | "developer" => ("system", text),
            "user" => ("user", text),
            "assistant" => match &m.tool_calls {
                Some(calls) if !calls.is_empty() => {
                    check_calls(calls, i)?;
                    calls_made.extend(
                        calls
                            .iter()
                            .map(|c| (c.id.as_str(), c.function.name.as_str())),
                    );
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
            "tool" => {
                let name = answered_call(m, i, &calls_made)?;
                (
                    "user",
                    tools::render_tool_result(m.name.as_deref().or(name), &text),
                )
            }
            // The legacy role: the result of the function `name`.
            "function" => match m.name.as_deref() {
                Some(name) if !name.is_empty() => {
                    ("user", tools::render_tool_result(Some(name), &text))
                }
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "messages[{i}] has role \"function\" but no name"
                    ))
                    .with_param(&format!("messages[{i}].name")))
                }
            },
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
    Ok((out, media))
}

/// An assistant message's `tool_calls` as a later request replays them: each needs an id (the
/// `tool` message answering it names it), the type `function`, a name, and arguments that are
/// a JSON object (they are written into the prompt as such; dropping them would change the
/// conversation behind the client's back).
fn check_calls(calls: &[crate::api::ToolCall], i: usize) -> Result<(), ApiError> {
    for (j, c) in calls.iter().enumerate() {
        let param = format!("messages[{i}].tool_calls[{j}]");
        let problem = if c.id.is_empty() {
            Some("has an empty id".to_string())
        } else if c.kind != "function" {
            Some(format!(
                "has type {:?}; only \"function\" is supported",
                c.kind
            ))
        } else if c.function.name.is_empty() {
            Some("has an empty function name".to_string())
        } else if !serde_json::from_str::<serde_json::Value>(&c.function.arguments)
            .is_ok_and(|v| v.is_object())
        {
            Some("has function.arguments that are not a JSON object".to_string())
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(ApiError::bad_request(format!("{param} {problem}")).with_param(&param));
        }
    }
    Ok(())
}

/// The function a `tool` message answers: its `tool_call_id` must name a call an earlier
/// assistant message made (as OpenAI requires).
fn answered_call<'a>(
    m: &crate::api::RequestMessage,
    i: usize,
    calls_made: &[(&str, &'a str)],
) -> Result<Option<&'a str>, ApiError> {
    let param = format!("messages[{i}].tool_call_id");
    let Some(id) = m.tool_call_id.as_deref() else {
        return Err(ApiError::bad_request(format!(
            "messages[{i}] has role \"tool\" but no tool_call_id: a tool message answers a \
             call of an earlier assistant message"
        ))
        .with_param(&param));
    };
    match calls_made.iter().find(|(made, _)| *made == id) {
        Some((_, name)) => Ok(Some(*name)),
        None => Err(ApiError::bad_request(format!(
            "messages[{i}].tool_call_id {id:?} does not match any tool call of an earlier \
             assistant message"
        ))
        .with_param(&param)),
    }
}

/// A message's text, with an [`IMAGE_MARKER`] for each image part and an [`AUDIO_MARKER`]
/// for each audio part (recorded in `media`).
fn content_text(
    content: Option<&MessageContent>,
    index: usize,
    reserved: &[(String, &str)],
    media: &mut MediaRefs,
) -> Result<String, ApiError> {
    let checked = |t: &str, param: String| check_reserved(t, &param, reserved);
    match content {
        None => Ok(String::new()),
        Some(MessageContent::Text(t)) => {
            checked(t, format!("messages[{index}].content"))?;
            Ok(t.clone())
        }
        Some(MessageContent::Parts(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match part.kind.as_str() {
                    "text" | "input_text" => {
                        let t = part.text.as_deref().unwrap_or("");
                        checked(t, format!("messages[{index}].content[{j}].text"))?;
                        text.push_str(t);
                    }
                    "image_url" => {
                        let param = format!("messages[{index}].content[{j}].image_url");
                        let Some(url) = &part.image_url else {
                            return Err(ApiError::bad_request(format!(
                                "messages[{index}].content[{j}] is an image_url part without \
                                 an image_url"
                            ))
                            .with_param(&param));
                        };
                        text.push_str(IMAGE_MARKER);
                        media.images.push(ImageRef {
                            url: url.url().to_owned(),
                            param,
                        });
                    }
                    "input_audio" => {
                        let param = format!("messages[{index}].content[{j}].input_audio");
                        let Some(audio) = &part.input_audio else {
                            return Err(ApiError::bad_request(format!(
                                "messages[{index}].content[{j}] is an input_audio part without \
                                 an input_audio object ({{\"data\": <base64>, \"format\": \
                                 \"wav\"}})"
                            ))
                            .with_param(&param));
                        };
                        text.push_str(AUDIO_MARKER);
                        media.audio.push(AudioRef {
                            data: audio.data.clone(),
                            format: audio.format.clone(),
                            param,
                        });
                    }
                    "input_image" | "audio" | "image" | "file" => {
                        return Err(ApiError::bad_request(format!(
                            "messages[{index}] has a {:?} content part: this server takes text, \
                             image_url and input_audio parts (files are not supported)",
                            part.kind
                        ))
                        .with_param(&format!("messages[{index}].content[{j}]"))
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

/// A 400 when `text` holds a text that only media may put in a prompt.
pub(crate) fn check_reserved(
    text: &str,
    param: &str,
    reserved: &[(String, &str)],
) -> Result<(), ApiError> {
    match reserved.iter().find(|(r, _)| text.contains(r.as_str())) {
        Some((r, what)) => {
            let part = if *what == "audio" {
                "audio as input_audio"
            } else {
                "images as image_url"
            };
            Err(ApiError::bad_request(format!(
                "{param} contains {r:?}, which stands for {what} in this model's prompts: send \
                 {part} content parts"
            ))
            .with_param(param))
        }
        None => Ok(()),
    }
}

/// The 400 for a client's schema the engine cannot enforce.
fn unsupported_schema(message: String, param: &str) -> ApiError {
    ApiError::bad_request(format!("unsupported JSON schema: {message}"))
        .with_param(param)
        .with_code("unsupported_schema")
}

/// When a request must be answered by.
pub fn deadline(timeout: Duration) -> Instant {
    Instant::now() + timeout
}
