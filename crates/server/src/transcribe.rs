//! OpenAI's audio endpoints, `POST /v1/audio/transcriptions` and `/v1/audio/translations`:
//! a multipart form with the audio `file`, answered as `json`, `text`, `verbose_json`, `srt` or
//! `vtt`, or streamed as `transcript.text.delta` / `transcript.text.done` server-sent events.
//!
//! Gemma 3n hears 30 s per clip. Each window of the file (cut at pauses, as the engine cuts
//! them) is one generation through the scheduler: a user turn holding the window's audio and
//! the task's instruction ([`AudioTask::instruction`]), rendered by the model's chat template
//! (`LoadedModel::audio_prompt`, as `gemma transcribe` does).
//! The windows run in order; their texts, trimmed, are joined with a space, and in
//! `verbose_json` each is one segment. Greedy unless `temperature` says otherwise.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gemma_engine::audio::{language_name, AudioTask};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::{SamplingFields, Usage};
use crate::error::ApiError;
use crate::media;
use crate::prepare::{check_reserved, PrepareContext, Prepared};
use crate::routes::{blocking, check_declared_length, failure, submit, too_large, AppState};
use crate::scheduler::JobEvent;
use crate::tools::ToolMode;

/// Most tokens generated per 30 s window: fast speech is about 100 words in 30 s, so this
/// leaves room for any language and stops a model that repeats itself.
pub const MAX_TOKENS_PER_WINDOW: usize = 512;

/// Which endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Transcription,
    Translation,
}

/// How the answer is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Text,
    VerboseJson,
    Srt,
    Vtt,
}

impl Format {
    fn parse(s: &str) -> Result<Format, ApiError> {
        Ok(match s.trim() {
            "" | "json" => Format::Json,
            "text" => Format::Text,
            "verbose_json" => Format::VerboseJson,
            "srt" => Format::Srt,
            "vtt" => Format::Vtt,
            other => {
                return Err(ApiError::bad_request(format!(
                    "response_format {other:?} is not supported; use json, text, verbose_json, \
                     srt or vtt"
                ))
                .with_param("response_format"))
            }
        })
    }
}

/// The form fields of a request.
#[derive(Debug, Default)]
struct Form {
    file: Option<Vec<u8>>,
    prompt: Option<String>,
    language: Option<String>,
    response_format: Option<String>,
    temperature: Option<String>,
    stream: Option<String>,
    granularities: Vec<String>,
}

/// The parsed request, ready for preparation.
struct AudioRequest {
    kind: Kind,
    file: Vec<u8>,
    prompt: Option<String>,
    language: Option<String>,
    format: Format,
    temperature: f32,
    stream: bool,
}

/// The windows of a request, each a prepared generation, and what the answer reports.
struct AudioJob {
    windows: Vec<Prepared>,
    /// Start and end of each window, in seconds.
    spans: Vec<(f64, f64)>,
    seconds: f64,
}

pub async fn transcriptions(State(state): State<Arc<AppState>>, request: Request) -> Response {
    handle(state, request, Kind::Transcription).await
}

pub async fn translations(State(state): State<Arc<AppState>>, request: Request) -> Response {
    handle(state, request, Kind::Translation).await
}

async fn handle(state: Arc<AppState>, request: Request, kind: Kind) -> Response {
    let result: Result<Response, ApiError> = async {
        let form = read_form(&state, request).await?;
        let req = validate(form, kind)?;
        let (format, stream, temperature, language) = (
            req.format,
            req.stream,
            req.temperature,
            req.language.clone(),
        );
        let ctx = state.prepare.clone();
        let mut job = blocking(move || prepare(&ctx, req)).await?;
        // The first window is queued before answering, so a full queue is a 429, not an
        // event in a stream that already said 200.
        let first = submit(&state, &mut job.windows[0])?;
        let deltas = stream;
        let (tx, rx) = mpsc::channel::<Progress>(64);
        let windows = std::mem::take(&mut job.windows);
        tokio::spawn(run_windows(state.clone(), windows, first, tx, deltas));
        let answer = Answer {
            kind,
            language,
            temperature,
            spans: job.spans,
            seconds: job.seconds,
        };
        if stream {
            return Ok(stream_events(rx));
        }
        let outcome = collect(rx).await?;
        Ok(answer.write(format, outcome))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// Reads the multipart form within the body limit (413 over it, 400 when it is not a form).
async fn read_form(state: &AppState, request: Request) -> Result<Form, ApiError> {
    check_declared_length(request.headers(), state.body_limit)?;
    let mut multipart = Multipart::from_request(request, &()).await.map_err(|e| {
        ApiError::bad_request(format!(
            "the request body must be multipart/form-data with a boundary ({})",
            e.body_text()
        ))
    })?;
    let bad_form = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(state.body_limit)
        } else {
            ApiError::bad_request(format!("invalid multipart body: {}", e.body_text()))
        }
    };
    let mut form = Form::default();
    while let Some(field) = multipart.next_field().await.map_err(bad_form)? {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            if form.file.is_some() {
                return Err(
                    ApiError::bad_request("the form has more than one file field")
                        .with_param("file"),
                );
            }
            form.file = Some(field.bytes().await.map_err(bad_form)?.to_vec());
            continue;
        }
        let slot = match name.as_str() {
            "prompt" => &mut form.prompt,
            "language" => &mut form.language,
            "response_format" => &mut form.response_format,
            "temperature" => &mut form.temperature,
            "stream" => &mut form.stream,
            "timestamp_granularities[]" | "timestamp_granularities" => {
                let value = field.text().await.map_err(bad_form)?;
                form.granularities.push(value);
                continue;
            }
            // `model` is accepted (this server has one); `include[]`, `chunking_strategy` and
            // anything else are ignored, as unknown JSON fields are.
            _ => {
                field.bytes().await.map_err(bad_form)?;
                continue;
            }
        };
        *slot = Some(field.text().await.map_err(bad_form)?);
    }
    Ok(form)
}

/// Checks the form's fields.
fn validate(form: Form, kind: Kind) -> Result<AudioRequest, ApiError> {
    let file = form.file.ok_or_else(|| {
        ApiError::bad_request("the form has no file field: send the audio as `file`")
            .with_param("file")
    })?;
    let format = Format::parse(form.response_format.as_deref().unwrap_or("json"))?;
    let temperature = match form.temperature.as_deref().map(str::trim) {
        None | Some("") => 0.0,
        Some(t) => t
            .parse::<f32>()
            .ok()
            .filter(|t| t.is_finite())
            .ok_or_else(|| {
                ApiError::bad_request(format!("temperature {t:?} is not a number"))
                    .with_param("temperature")
            })?,
    };
    let stream = match form
        .stream
        .as_deref()
        .map(|s| s.trim().to_ascii_lowercase())
    {
        None => false,
        Some(s) => match s.as_str() {
            "true" | "1" => true,
            "false" | "0" | "" => false,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "stream must be true or false, not {s:?}"
                ))
                .with_param("stream"))
            }
        },
    };
    if stream && !matches!(format, Format::Json | Format::Text) {
        return Err(ApiError::bad_request(
            "stream=true sends transcript.text events; it goes with response_format json or \
             text",
        )
        .with_param("response_format"));
    }
    if let Some(g) = form.granularities.iter().find(|g| g.trim() != "segment") {
        return Err(ApiError::bad_request(format!(
            "timestamp_granularities {g:?} is not supported: segments are the audio's 30 s \
             windows (\"segment\")"
        ))
        .with_param("timestamp_granularities"));
    }
    let language = form
        .language
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty());
    if let Some(l) = &language {
        if l.chars().count() > 64 || l.chars().any(char::is_control) {
            return Err(ApiError::bad_request(
                "language must be a language name or an ISO-639-1 code such as \"en\"",
            )
            .with_param("language"));
        }
    }
    let prompt = form.prompt.filter(|p| !p.trim().is_empty());
    Ok(AudioRequest {
        kind,
        file,
        prompt,
        language: if kind == Kind::Transcription {
            language
        } else {
            None
        },
        format,
        temperature,
        stream,
    })
}

/// The instruction of a request: the task's, the language hint, then the client's prompt.
fn instruction(req: &AudioRequest) -> String {
    let task = match req.kind {
        Kind::Transcription => AudioTask::Transcribe,
        // OpenAI's translations are into English.
        Kind::Translation => AudioTask::Translate { to: "en".into() },
    };
    let mut text = task.instruction();
    if let Some(l) = &req.language {
        text.push_str(&format!(" The speech is in {}.", language_name(l)));
    }
    if let Some(p) = &req.prompt {
        text.push(' ');
        text.push_str(p.trim());
    }
    text
}

/// Decodes the file and prepares one generation per window (the audio tower runs here).
fn prepare(ctx: &PrepareContext, req: AudioRequest) -> Result<AudioJob, ApiError> {
    let reserved = ctx.reserved_texts();
    if let Some(p) = &req.prompt {
        check_reserved(p, "prompt", &reserved)?;
    }
    if let Some(l) = &req.language {
        check_reserved(l, "language", &reserved)?;
    }
    let rendered = ctx.loaded.audio_prompt(&instruction(&req)).map_err(|e| {
        ApiError::internal(format!("cannot render the transcription prompt: {e:#}"))
    })?;
    let _busy = ctx.media_work.lock().unwrap_or_else(|e| e.into_inner());
    let clip = media::clip(&ctx.loaded, &ctx.media, &req.file, "file")?;
    let n = clip.windows.len();
    let mut windows = Vec::with_capacity(n);
    let mut spans = Vec::with_capacity(n);
    for i in 0..n {
        let (prompt, soft) = ctx.encode_media(&rendered, &[], &[clip.window(i)], "file")?;
        let fields = SamplingFields {
            temperature: Some(req.temperature),
            ..SamplingFields::default()
        };
        let (params, _, _) = ctx.sampling(&fields, Some(MAX_TOKENS_PER_WINDOW), prompt.len())?;
        windows.push(Prepared {
            prompt,
            soft,
            params,
            // The chosen tokens' log-probabilities, for the segments' avg_logprob.
            logprobs: (req.format == Format::VerboseJson).then_some(0),
            grammar: None,
            tools: Vec::new(),
            tool_mode: ToolMode::Off,
            stream: req.stream,
            include_usage: false,
            // Transcripts are not filtered (see the README's safety-filter section).
            shield: None,
        });
        spans.push((clip.starts[i], clip.window_end(i)));
    }
    Ok(AudioJob {
        windows,
        spans,
        seconds: clip.seconds,
    })
}

/// What the windows' generations report to the writer.
enum Progress {
    /// Text to stream, already joined across windows.
    Delta(String),
    Done(Outcome),
    Failed(ApiError),
}

/// Every window's result.
#[derive(Default)]
struct Outcome {
    /// Each window's text, trimmed.
    texts: Vec<String>,
    /// Each window's generated token ids (the stop token left out).
    tokens: Vec<Vec<u32>>,
    /// Each window's mean log-probability per generated token, when asked for.
    avg_logprobs: Vec<Option<f64>>,
    usage: Usage,
}

impl Outcome {
    fn text(&self) -> String {
        join(&self.texts)
    }
}

/// The windows' texts as one: trimmed, empty ones left out, joined with a space.
fn join(texts: &[String]) -> String {
    texts
        .iter()
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Streamed text joined the way [`join`] joins whole windows: a window's leading whitespace
/// dropped, its trailing whitespace held back until more text follows in the same window, and
/// one space between windows that have text. The deltas add up to the joined text.
#[derive(Default)]
struct Joiner {
    emitted: bool,
    in_text: bool,
    pending: String,
}

impl Joiner {
    fn push(&mut self, piece: &str) -> String {
        let mut out = String::new();
        for c in piece.chars() {
            if c.is_whitespace() {
                if self.in_text {
                    self.pending.push(c);
                }
                continue;
            }
            if !self.in_text {
                self.in_text = true;
                if self.emitted {
                    out.push(' ');
                }
            }
            out.push_str(&self.pending);
            self.pending.clear();
            out.push(c);
            self.emitted = true;
        }
        out
    }

    fn end_window(&mut self) {
        self.in_text = false;
        self.pending.clear();
    }
}

/// Generates the windows one after another (the first already queued as `first`), sending
/// joined deltas when `deltas`, then the outcome. Stops, dropping the current job (which frees
/// its slot), when the receiver goes away.
async fn run_windows(
    state: Arc<AppState>,
    mut windows: Vec<Prepared>,
    first: mpsc::UnboundedReceiver<JobEvent>,
    tx: mpsc::Sender<Progress>,
    deltas: bool,
) {
    let stop_ids = state.prepare.loaded.stop_token_ids();
    let mut outcome = Outcome::default();
    let mut joiner = Joiner::default();
    let mut events = Some(first);
    for window in &mut windows {
        let mut rx = match events.take() {
            Some(rx) => rx,
            None => match submit(&state, window) {
                Ok(rx) => rx,
                Err(e) => {
                    let _ = tx.send(Progress::Failed(e)).await;
                    return;
                }
            },
        };
        let mut text = String::new();
        let mut logprob_sum = 0.0f64;
        let mut logprob_count = 0usize;
        loop {
            let event = tokio::select! {
                event = rx.recv() => event,
                _ = tx.closed() => return,
            };
            match event {
                Some(JobEvent::Token {
                    text: piece,
                    logprobs,
                }) => {
                    if let Some(lp) = logprobs {
                        logprob_sum += f64::from(lp.logprob);
                        logprob_count += 1;
                    }
                    text.push_str(&piece);
                    if deltas {
                        let delta = joiner.push(&piece);
                        if !delta.is_empty() && tx.send(Progress::Delta(delta)).await.is_err() {
                            return;
                        }
                    }
                }
                Some(JobEvent::Done { usage, timings, .. }) => {
                    outcome.usage = Usage::new(
                        outcome.usage.prompt_tokens + usage.prompt_tokens,
                        outcome.usage.completion_tokens + usage.completion_tokens,
                    );
                    let mut tokens = timings.generated;
                    if tokens.last().is_some_and(|t| stop_ids.contains(t)) {
                        tokens.pop();
                    }
                    outcome.tokens.push(tokens);
                    outcome
                        .avg_logprobs
                        .push((logprob_count > 0).then(|| logprob_sum / logprob_count as f64));
                    outcome.texts.push(text.trim().to_owned());
                    joiner.end_window();
                    break;
                }
                Some(JobEvent::Failed(message)) => {
                    let _ = tx.send(Progress::Failed(failure(message))).await;
                    return;
                }
                None => {
                    let error = ApiError::internal("the scheduler stopped");
                    let _ = tx.send(Progress::Failed(error)).await;
                    return;
                }
            }
        }
    }
    let _ = tx.send(Progress::Done(outcome)).await;
}

/// The outcome of a non-streamed request.
async fn collect(mut rx: mpsc::Receiver<Progress>) -> Result<Outcome, ApiError> {
    loop {
        match rx.recv().await {
            Some(Progress::Delta(_)) => {}
            Some(Progress::Done(outcome)) => return Ok(outcome),
            Some(Progress::Failed(e)) => return Err(e),
            None => return Err(ApiError::internal("the transcription stopped")),
        }
    }
}

/// `transcript.text.delta` events, then `transcript.text.done` (or an error object, which
/// OpenAI's clients raise).
fn stream_events(mut rx: mpsc::Receiver<Progress>) -> Response {
    let (out_tx, out_rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let mut text = String::new();
        while let Some(progress) = rx.recv().await {
            let (value, last) = match progress {
                Progress::Delta(delta) => {
                    text.push_str(&delta);
                    (
                        json!({"type": "transcript.text.delta", "delta": delta}),
                        false,
                    )
                }
                Progress::Done(outcome) => {
                    debug_assert_eq!(text, outcome.text());
                    (
                        json!({
                            "type": "transcript.text.done",
                            "text": outcome.text(),
                            "usage": usage(&outcome.usage),
                        }),
                        true,
                    )
                }
                Progress::Failed(e) => (e.body(), true),
            };
            if out_tx
                .send(Ok(Event::default().data(value.to_string())))
                .await
                .is_err()
                || last
            {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(out_rx)).into_response()
}

/// OpenAI's token usage of audio models.
fn usage(u: &Usage) -> Value {
    json!({
        "type": "tokens",
        "input_tokens": u.prompt_tokens,
        "output_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    })
}

/// What the written answer needs besides the outcome.
struct Answer {
    kind: Kind,
    language: Option<String>,
    temperature: f32,
    spans: Vec<(f64, f64)>,
    seconds: f64,
}

impl Answer {
    fn write(&self, format: Format, outcome: Outcome) -> Response {
        let text = outcome.text();
        match format {
            Format::Json => {
                Json(json!({"text": text, "usage": usage(&outcome.usage)})).into_response()
            }
            Format::Text => plain("text/plain; charset=utf-8", text),
            Format::VerboseJson => Json(self.verbose(&outcome, text)).into_response(),
            Format::Srt => plain("text/plain; charset=utf-8", self.subtitles(&outcome, false)),
            Format::Vtt => plain("text/vtt; charset=utf-8", self.subtitles(&outcome, true)),
        }
    }

    fn verbose(&self, outcome: &Outcome, text: String) -> Value {
        let segments: Vec<Value> = self
            .spans
            .iter()
            .enumerate()
            .map(|(i, &(start, end))| {
                json!({
                    "id": i,
                    "seek": (start * 100.0).round() as u64,
                    "start": start,
                    "end": end,
                    "text": outcome.texts.get(i).cloned().unwrap_or_default(),
                    "tokens": outcome.tokens.get(i).cloned().unwrap_or_default(),
                    "temperature": self.temperature,
                    "avg_logprob": outcome.avg_logprobs.get(i).copied().flatten(),
                })
            })
            .collect();
        json!({
            "task": match self.kind {
                Kind::Transcription => "transcribe",
                Kind::Translation => "translate",
            },
            // The language is not detected: the hint's name when one was given.
            "language": self
                .language
                .as_deref()
                .map(|l| language_name(l).to_lowercase())
                .unwrap_or_else(|| "unknown".into()),
            "duration": self.seconds,
            "text": text,
            "segments": segments,
            "usage": usage(&outcome.usage),
        })
    }

    /// SubRip or WebVTT cues, one per window that has text.
    fn subtitles(&self, outcome: &Outcome, vtt: bool) -> String {
        let mut out = String::new();
        if vtt {
            out.push_str("WEBVTT\n\n");
        }
        let cues = self
            .spans
            .iter()
            .zip(&outcome.texts)
            .filter(|(_, t)| !t.is_empty());
        for (n, (&(start, end), text)) in cues.enumerate() {
            if !vtt {
                out.push_str(&format!("{}\n", n + 1));
            }
            out.push_str(&format!(
                "{} --> {}\n{text}\n\n",
                timestamp(start, vtt),
                timestamp(end, vtt)
            ));
        }
        out
    }
}

/// `HH:MM:SS,mmm` (SubRip) or `HH:MM:SS.mmm` (WebVTT).
fn timestamp(seconds: f64, vtt: bool) -> String {
    let ms = (seconds.max(0.0) * 1000.0).round() as u64;
    let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let sep = if vtt { '.' } else { ',' };
    format!("{h:02}:{m:02}:{s:02}{sep}{ms:03}")
}

fn plain(content_type: &'static str, body: String) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_deltas_add_up_to_the_joined_text() {
        let windows: [&[&str]; 4] = [
            &["  Hello", ",", " world", " \n"],
            &["\n", " "],
            &[" second ", "", "window", "\n"],
            &["third"],
        ];
        let mut joiner = Joiner::default();
        let mut streamed = String::new();
        let mut texts = Vec::new();
        for pieces in windows {
            for p in pieces {
                streamed.push_str(&joiner.push(p));
            }
            joiner.end_window();
            texts.push(pieces.concat());
        }
        assert_eq!(streamed, join(&texts));
        assert_eq!(streamed, "Hello, world second window third");
    }

    #[test]
    fn subtitle_timestamps() {
        assert_eq!(timestamp(0.0, false), "00:00:00,000");
        assert_eq!(timestamp(3725.5, true), "01:02:05.500");
    }

    #[test]
    fn response_formats() {
        assert_eq!(Format::parse("json").unwrap(), Format::Json);
        assert_eq!(Format::parse("verbose_json").unwrap(), Format::VerboseJson);
        let e = Format::parse("diarized_json").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
