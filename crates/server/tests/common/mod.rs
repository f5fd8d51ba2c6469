//! Helpers for the server tests: start the real server on a loopback port with the real
//! default model, and a minimal HTTP/1.1 client over `TcpStream` (no extra dependencies).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gemma_server::{RunningServer, ServerConfig};
use serde_json::{json, Value};

/// Starts a server with `parallel` slots on a free port. One compute thread keeps parallel
/// test binaries from fighting over the two cores.
pub fn start_server(parallel: usize, queue_capacity: usize) -> RunningServer {
    start_server_with_context(parallel, queue_capacity, 512)
}

pub fn start_server_with_context(
    parallel: usize,
    queue_capacity: usize,
    ctx_size: usize,
) -> RunningServer {
    start_server_with(ServerConfig {
        port: 0,
        parallel,
        ctx_size,
        queue_capacity,
        body_limit: 64 * 1024,
        // No prompt store: these servers' tests compare runs on slots that have or have not
        // seen a prompt (the store has tests of its own).
        prompt_cache_bytes: 0,
        ..ServerConfig::default()
    })
}

pub fn start_server_with(config: ServerConfig) -> RunningServer {
    std::env::set_var("GEMMA_THREADS", "1");
    let path = gemma_engine::ensure_default_model().expect("the default model is available");
    let loaded = gemma_engine::load(Some(&path), &Default::default()).expect("the model loads");
    gemma_server::start(loaded, config).expect("the server starts")
}

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of a server-sent-events body, in order.
    pub fn sse_data(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.trim_start().to_owned())
            .collect()
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to the server");
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    stream
}

pub fn send_request(stream: &mut TcpStream, method: &str, path: &str, body: Option<&[u8]>) {
    send_typed_request(stream, method, path, "application/json", body)
}

/// [`send_request`] with a body of another content type.
pub fn send_typed_request(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<&[u8]>,
) {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    if let Some(body) = body {
        stream.write_all(body).unwrap();
    }
}

/// Reads the status line and headers.
pub fn read_head(reader: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    (status, headers)
}

pub fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> HttpResponse {
    let bytes = body.map(|b| serde_json::to_vec(b).unwrap());
    request_raw(addr, method, path, bytes.as_deref())
}

pub fn request_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> HttpResponse {
    request_typed(addr, method, path, "application/json", body)
}

/// A request whose body has `content_type` (multipart forms).
pub fn request_typed(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<&[u8]>,
) -> HttpResponse {
    let mut stream = connect(addr);
    send_typed_request(&mut stream, method, path, content_type, body);
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size_line = String::new();
            if reader.read_line(&mut size_line).unwrap() == 0 {
                break;
            }
            let size = usize::from_str_radix(size_line.trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        reader.read_to_end(&mut body).unwrap();
    }
    HttpResponse {
        status,
        headers,
        body,
    }
}

pub fn post(addr: SocketAddr, path: &str, body: &Value) -> HttpResponse {
    request(addr, "POST", path, Some(body))
}

/// The value of a Prometheus metric line `name value`.
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = request(addr, "GET", "/metrics", None).text();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
}

/// The concatenated `content` deltas of a streamed chat completion.
pub fn streamed_content(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// Tests that read global counters (or need the slots to themselves) run one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A greedy chat request with one user message.
pub fn chat_body(prompt: &str, max_tokens: usize) -> Value {
    json!({
        "model": "gemma",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// The JSON chunks of a streamed reply (status 200, ended by `data: [DONE]`).
pub fn sse_chunks(r: &HttpResponse) -> Vec<Value> {
    assert_eq!(r.status, 200, "{}", r.text());
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("chunk {d}: {e}")))
        .collect()
}

/// Sends `body` with `"stream": true` to the chat endpoint and returns the chunks.
pub fn post_stream(addr: SocketAddr, body: &Value) -> Vec<Value> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    sse_chunks(&post(addr, "/v1/chat/completions", &body))
}

/// Starts a streaming chat request and returns the connection once `events` data lines
/// have arrived (the request then holds a slot).
pub fn open_stream(addr: SocketAddr, body: &Value, events: usize) -> BufReader<TcpStream> {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let mut stream = connect(addr);
    let bytes = serde_json::to_vec(&body).unwrap();
    send_request(&mut stream, "POST", "/v1/chat/completions", Some(&bytes));
    let mut reader = BufReader::new(stream);
    let (status, _) = read_head(&mut reader);
    assert_eq!(status, 200);
    let mut seen = 0;
    let mut line = String::new();
    while seen < events {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stream ended early"
        );
        if line.contains("data:") {
            seen += 1;
        }
    }
    reader
}

/// Everything left on a connection, up to its end.
pub fn read_rest(reader: &mut impl BufRead) -> String {
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    rest
}

/// Polls a metric until `pred` holds (a minute at most) and returns its value.
pub fn wait_for_metric(addr: SocketAddr, name: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let start = Instant::now();
    loop {
        let value = metric(addr, name);
        if pred(value) {
            return value;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{name} stuck at {value}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One tool call put together from streamed `tool_calls` deltas, as OpenAI clients do.
#[derive(Debug, Default)]
pub struct StreamedCall {
    pub id: String,
    pub kind: String,
    pub name: String,
    pub arguments: String,
    /// Deltas that carried a non-empty piece of the arguments.
    pub argument_chunks: usize,
}

/// The calls of a streamed chat reply, by `index`. The first delta of a call must carry its
/// id, type and name; later deltas only arguments.
pub fn streamed_tool_calls(chunks: &[Value]) -> Vec<StreamedCall> {
    let mut calls: Vec<StreamedCall> = Vec::new();
    let deltas = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten();
    for delta in deltas {
        let index = delta["index"].as_u64().expect("every delta has an index") as usize;
        if index == calls.len() {
            let id = delta["id"]
                .as_str()
                .expect("a call's first delta has its id");
            calls.push(StreamedCall {
                id: id.to_owned(),
                kind: delta["type"].as_str().unwrap_or_default().to_owned(),
                name: delta["function"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                ..StreamedCall::default()
            });
        } else {
            assert!(
                index < calls.len(),
                "delta for call {index} before its start"
            );
            assert!(
                delta.get("id").is_none(),
                "a later delta repeats the id: {delta}"
            );
        }
        let piece = delta["function"]["arguments"].as_str().unwrap_or_default();
        let call = &mut calls[index];
        call.arguments.push_str(piece);
        call.argument_chunks += usize::from(!piece.is_empty());
    }
    calls
}

/// The tiny random Gemma 3 vision model (SigLIP tower in the folder, 16 tokens per image).
pub fn vision_model_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3_vision_tiny/hf")
}

/// A test image of the vision fixture, by file name.
pub fn fixture_image(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gemma3_vision_tiny")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

pub fn load_vision_model() -> gemma_engine::LoadedModel {
    gemma_engine::load(Some(&vision_model_dir()), &Default::default())
        .expect("the vision fixture loads")
}

/// Starts a server on the tiny vision model (`config.port` is forced to 0).
pub fn start_vision_server(config: ServerConfig) -> RunningServer {
    std::env::set_var("GEMMA_THREADS", "1");
    let config = ServerConfig { port: 0, ..config };
    gemma_server::start(load_vision_model(), config).expect("the server starts")
}

/// `data:<mime>;base64,<bytes>`.
pub fn data_url(mime: &str, bytes: &[u8]) -> String {
    use base64::Engine as _;
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// An OpenAI `image_url` content part.
pub fn image_part(url: &str) -> Value {
    json!({"type": "image_url", "image_url": {"url": url, "detail": "auto"}})
}

pub fn text_part(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

/// A greedy chat request whose single user message has `parts`.
pub fn parts_body(parts: Vec<Value>, max_tokens: usize) -> Value {
    json!({
        "model": "gemma",
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// What the client venv holds: the official `openai` and `ollama` clients and `jsonschema`.
pub const CLIENT_PACKAGES: &[&str] = &["openai", "jsonschema", "ollama"];

/// The python of the client venv (`<cache>/venvs/openai-client`), creating the venv and
/// installing [`CLIENT_PACKAGES`] when missing. A stamp file listing the packages, written
/// after a successful install, marks the venv complete: an interrupted install is redone, and
/// a venv made for fewer packages gets the missing ones.
pub fn client_venv() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = gemma_engine::default_model::cache_dir().join("venvs/openai-client");
    let python = dir.join("bin/python");
    let stamp = dir.join(".installed");
    let wanted = CLIENT_PACKAGES.join("\n");
    if python.exists() {
        match std::fs::read_to_string(&stamp) {
            Ok(installed) if installed == wanted => return python,
            Ok(_) => {
                // An older venv: add what is missing.
                run_checked(
                    Command::new(&python)
                        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                        .args(CLIENT_PACKAGES),
                );
                std::fs::write(&stamp, &wanted).expect("the stamp can be written");
                return python;
            }
            Err(_) => {}
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.parent().unwrap()).expect("the cache folder can be created");
    run_checked(Command::new("python3").arg("-m").arg("venv").arg(&dir));
    run_checked(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(CLIENT_PACKAGES),
    );
    std::fs::write(&stamp, &wanted).expect("the stamp can be written");
    python
}

#[track_caller]
pub fn run_checked(cmd: &mut Command) {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (python3 with venv is required)"));
    assert!(
        output.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs a client check script from `scripts/` with the client venv's python and `args`;
/// asserts it exits 0 and prints `all checks passed`.
pub fn run_client_script(script: &str, args: &[String]) {
    let python = client_venv();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(script);
    let output = Command::new(&python)
        .arg(&script)
        .args(args)
        .output()
        .expect("the client script runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        output.status.success(),
        "{} failed:\n{stdout}\n{stderr}",
        script.display()
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

/// The JSON objects of a newline-delimited JSON body; every line must parse.
pub fn ndjson_lines(r: &HttpResponse) -> Vec<Value> {
    r.text()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?}: {e}")))
        .collect()
}

/// `(event, data)` pairs of a server-sent-events body with `event:` lines.
pub fn sse_events(r: &HttpResponse) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut kind = String::new();
    for line in r.text().lines() {
        if let Some(k) = line.strip_prefix("event:") {
            kind = k.trim().to_owned();
        } else if let Some(d) = line.strip_prefix("data:") {
            let data =
                serde_json::from_str(d.trim()).unwrap_or_else(|e| panic!("event data {d:?}: {e}"));
            out.push((std::mem::take(&mut kind), data));
        }
    }
    out
}
