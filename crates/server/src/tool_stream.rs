//! Recognizes tool calls in generated text as it arrives, so a call's arguments can be
//! streamed while the model writes them (OpenAI's `tool_calls` deltas).
//!
//! A call is the object `{"name": "<tool>", "parameters": <value>}` (or `"arguments"`), at
//! the start of a line, optionally inside a code fence and/or a JSON array, several one per
//! line or comma-separated in the array. Text before a call stays reply text; text that can
//! still turn into a call header is held until it is clear either way. The same parser reads
//! a whole reply (non-streaming), so both paths agree on content and arguments exactly.

/// What a piece of generated text turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum CallEvent {
    /// Ordinary reply text.
    Text(String),
    /// Call number `index` (from 0) to the tool `name` begins.
    Start { index: usize, name: String },
    /// More of the JSON text of call `index`'s arguments.
    Arguments { index: usize, fragment: String },
}

/// A call found in the reply: its arguments are the model's JSON text, verbatim.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
    /// The call object was closed (not cut off by the end of generation).
    pub complete: bool,
}

/// The incremental parser: feed text with [`CallParser::push`], end with
/// [`CallParser::finish`].
pub struct CallParser {
    names: Vec<String>,
    /// Text received but not yet classified.
    pending: String,
    state: State,
    /// Around the calls: a JSON array, a code fence.
    framing: Framing,
    calls: Vec<ParsedCall>,
}

#[derive(Clone, Copy, Default)]
struct Framing {
    in_array: bool,
    fenced: bool,
}

enum State {
    /// Outside calls. `line_start`: `pending` begins a line, where a call may begin.
    Text { line_start: bool },
    /// Inside the arguments value of the last call.
    Arguments(ValueScan),
    /// After the arguments value, up to the `}` that closes the call object.
    CallEnd(ValueScan),
    /// After a call: another may follow; a closing `]` or fence is consumed.
    Between,
}

impl CallParser {
    /// A parser that recognizes calls to the tools named `names` only.
    pub fn new(names: Vec<String>) -> CallParser {
        CallParser {
            names,
            pending: String::new(),
            state: State::Text { line_start: true },
            framing: Framing::default(),
            calls: Vec::new(),
        }
    }

    /// Feeds newly generated text; returns what can be told about it now.
    pub fn push(&mut self, text: &str) -> Vec<CallEvent> {
        self.pending.push_str(text);
        let mut events = Vec::new();
        while self.step(&mut events) {}
        events
    }

    /// Ends the reply: text still held (a call header that never completed) is reply text.
    pub fn finish(&mut self) -> Vec<CallEvent> {
        let mut events = Vec::new();
        if !self.pending.is_empty() {
            events.push(CallEvent::Text(std::mem::take(&mut self.pending)));
        }
        self.state = State::Text { line_start: false };
        events
    }

    /// The calls found so far.
    pub fn calls(&self) -> &[ParsedCall] {
        &self.calls
    }

    /// Parses a whole reply at once: its text parts (concatenated) and its calls.
    pub fn parse_all(mut self, reply: &str) -> (String, Vec<ParsedCall>) {
        let mut events = self.push(reply);
        events.extend(self.finish());
        let text = events
            .into_iter()
            .filter_map(|e| match e {
                CallEvent::Text(t) => Some(t),
                _ => None,
            })
            .collect();
        (text, self.calls)
    }

    /// One unit of progress; `false` when more text is needed.
    fn step(&mut self, events: &mut Vec<CallEvent>) -> bool {
        if self.pending.is_empty() {
            return false;
        }
        match &mut self.state {
            State::Text { line_start: false } => {
                let newline = self.pending.find('\n');
                let line_ended = newline.is_some();
                let end = newline.map_or(self.pending.len(), |i| i + 1);
                events.push(CallEvent::Text(self.pending.drain(..end).collect()));
                self.state = State::Text {
                    line_start: line_ended,
                };
                line_ended
            }
            State::Text { line_start: true } => {
                match match_header(&self.pending, &self.names, true) {
                    HeaderMatch::Partial => false,
                    HeaderMatch::No => {
                        self.state = State::Text { line_start: false };
                        true
                    }
                    HeaderMatch::Call(header) => {
                        self.framing = Framing::default();
                        self.start_call(header, events);
                        true
                    }
                }
            }
            State::Arguments(scan) => {
                let mut fragment = String::new();
                let mut consumed = self.pending.len();
                let mut ended = false;
                for (i, c) in self.pending.char_indices() {
                    match scan.feed(c) {
                        Scan::Inside => fragment.push(c),
                        Scan::Last => {
                            fragment.push(c);
                            consumed = i + c.len_utf8();
                            ended = true;
                            break;
                        }
                        Scan::After => {
                            consumed = i;
                            ended = true;
                            break;
                        }
                    }
                }
                self.pending.drain(..consumed);
                if !fragment.is_empty() {
                    let index = self.calls.len() - 1;
                    self.calls[index].arguments.push_str(&fragment);
                    events.push(CallEvent::Arguments { index, fragment });
                }
                if ended {
                    self.state = State::CallEnd(ValueScan::inside_object());
                }
                ended
            }
            State::CallEnd(scan) => {
                let closed = self
                    .pending
                    .char_indices()
                    .find(|&(_, c)| scan.feed(c) == Scan::Last)
                    .map(|(i, c)| i + c.len_utf8());
                match closed {
                    Some(end) => {
                        self.pending.drain(..end);
                        if let Some(call) = self.calls.last_mut() {
                            call.complete = true;
                        }
                        self.state = State::Between;
                        true
                    }
                    None => {
                        self.pending.clear();
                        false
                    }
                }
            }
            State::Between => {
                let Framing { in_array, fenced } = self.framing;
                let rest = self.pending.trim_start();
                let skipped = self.pending.len() - rest.len();
                self.pending.drain(..skipped);
                if self.pending.is_empty() {
                    return false;
                }
                if in_array && self.pending.starts_with(']') {
                    self.pending.drain(..1);
                    self.framing.in_array = false;
                    return true;
                }
                if fenced && self.pending.starts_with("```") {
                    self.pending.drain(..3);
                    self.framing.fenced = false;
                    return true;
                }
                if fenced && "```".starts_with(self.pending.as_str()) {
                    return false;
                }
                let next = if in_array && self.pending.starts_with(',') {
                    match_header(&self.pending[1..], &self.names, false).shifted(1)
                } else if self.pending.starts_with('{') {
                    match_header(&self.pending, &self.names, false)
                } else {
                    HeaderMatch::No
                };
                match next {
                    HeaderMatch::Partial => false,
                    HeaderMatch::No => {
                        // Whatever follows the calls is reply text again.
                        self.state = State::Text { line_start: false };
                        true
                    }
                    HeaderMatch::Call(header) => {
                        self.start_call(header, events);
                        true
                    }
                }
            }
        }
    }

    /// Consumes a recognized call header and enters its arguments.
    fn start_call(&mut self, header: Header, events: &mut Vec<CallEvent>) {
        self.pending.drain(..header.len);
        self.framing.in_array |= header.in_array;
        self.framing.fenced |= header.fenced;
        let index = self.calls.len();
        events.push(CallEvent::Start {
            index,
            name: header.name.clone(),
        });
        self.calls.push(ParsedCall {
            name: header.name,
            arguments: String::new(),
            complete: false,
        });
        if header.without_arguments {
            // `{"name": "f"}`: a call without arguments.
            let fragment = "{}".to_owned();
            self.calls[index].arguments = fragment.clone();
            self.calls[index].complete = true;
            events.push(CallEvent::Arguments { index, fragment });
            self.state = State::Between;
        } else {
            self.state = State::Arguments(ValueScan::default());
        }
    }
}

/// A recognized call header: `len` bytes up to the first byte of the arguments value.
struct Header {
    len: usize,
    name: String,
    in_array: bool,
    fenced: bool,
    /// The object closed right after the name.
    without_arguments: bool,
}

enum HeaderMatch {
    /// The text so far is a prefix of a header.
    Partial,
    /// It is not a call.
    No,
    Call(Header),
}

impl HeaderMatch {
    /// The same match for text that starts `offset` bytes later.
    fn shifted(self, offset: usize) -> HeaderMatch {
        match self {
            HeaderMatch::Call(mut h) => {
                h.len += offset;
                HeaderMatch::Call(h)
            }
            other => other,
        }
    }
}

/// Why a header read stopped early.
enum Stop {
    Partial,
    No,
}

/// Reads a header from the start of `text`: with `framed`, optional white space, code fence
/// and `[` first; then `{"name": "<one of names>", "parameters": ` (or `"arguments"`).
fn match_header(text: &str, names: &[String], framed: bool) -> HeaderMatch {
    let mut reader = HeaderReader {
        bytes: text.as_bytes(),
        at: 0,
    };
    match reader.header(names, framed) {
        Ok(header) => HeaderMatch::Call(header),
        Err(Stop::Partial) => HeaderMatch::Partial,
        Err(Stop::No) => HeaderMatch::No,
    }
}

struct HeaderReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl HeaderReader<'_> {
    fn header(&mut self, names: &[String], framed: bool) -> Result<Header, Stop> {
        let (mut fenced, mut in_array) = (false, false);
        self.skip_ws();
        if framed {
            if self.peek()? == b'`' {
                self.literal(b"```")?;
                while self.peek()?.is_ascii_alphanumeric() || matches!(self.peek()?, b'_' | b'-') {
                    self.at += 1;
                }
                self.literal(b"\n")?;
                fenced = true;
                self.skip_ws();
            }
            if self.peek()? == b'[' {
                self.at += 1;
                in_array = true;
                self.skip_ws();
            }
        }
        self.literal(b"{")?;
        self.skip_ws();
        self.literal(b"\"name\"")?;
        self.skip_ws();
        self.literal(b":")?;
        self.skip_ws();
        let name = self.string(names)?;
        self.skip_ws();
        let without_arguments = match self.peek()? {
            b'}' => {
                self.at += 1;
                true
            }
            b',' => {
                self.at += 1;
                self.skip_ws();
                let keys = ["parameters".to_owned(), "arguments".to_owned()];
                self.string(&keys)?;
                self.skip_ws();
                self.literal(b":")?;
                self.skip_ws();
                self.peek()?; // the value's first byte must be here
                false
            }
            _ => return Err(Stop::No),
        };
        Ok(Header {
            len: self.at,
            name,
            in_array,
            fenced,
            without_arguments,
        })
    }

    fn peek(&self) -> Result<u8, Stop> {
        self.bytes.get(self.at).copied().ok_or(Stop::Partial)
    }

    fn skip_ws(&mut self) {
        while self
            .bytes
            .get(self.at)
            .is_some_and(|b| b.is_ascii_whitespace())
        {
            self.at += 1;
        }
    }

    fn literal(&mut self, lit: &[u8]) -> Result<(), Stop> {
        let rest = &self.bytes[self.at..];
        let n = rest.len().min(lit.len());
        if rest[..n] != lit[..n] {
            return Err(Stop::No);
        }
        if n < lit.len() {
            return Err(Stop::Partial);
        }
        self.at += n;
        Ok(())
    }

    /// A JSON string without escapes that is one of `allowed` (or a prefix of one, so far).
    fn string(&mut self, allowed: &[String]) -> Result<String, Stop> {
        self.literal(b"\"")?;
        let start = self.at;
        let rest = &self.bytes[start..];
        match rest.iter().position(|&b| b == b'"') {
            Some(end) => {
                let word = &rest[..end];
                match allowed.iter().find(|a| a.as_bytes() == word) {
                    Some(found) => {
                        self.at = start + end + 1;
                        Ok(found.clone())
                    }
                    None => Err(Stop::No),
                }
            }
            None if allowed.iter().any(|a| a.as_bytes().starts_with(rest)) => Err(Stop::Partial),
            None => Err(Stop::No),
        }
    }
}

/// Where one character stands relative to a JSON value being scanned.
#[derive(Debug, PartialEq)]
enum Scan {
    Inside,
    /// The character closes the value.
    Last,
    /// The value ended before this character.
    After,
}

/// Finds the end of a JSON value character by character (brackets and strings; the value is
/// not validated).
#[derive(Default)]
struct ValueScan {
    started: bool,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl ValueScan {
    /// Scanning the rest of an object whose `{` was already read.
    fn inside_object() -> ValueScan {
        ValueScan {
            started: true,
            depth: 1,
            ..ValueScan::default()
        }
    }

    fn feed(&mut self, c: char) -> Scan {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if c == '\\' {
                self.escaped = true;
            } else if c == '"' {
                self.in_string = false;
                if self.depth == 0 {
                    return Scan::Last;
                }
            }
            return Scan::Inside;
        }
        let first = !self.started;
        self.started = true;
        match c {
            '"' => self.in_string = true,
            '{' | '[' => self.depth += 1,
            '}' | ']' if self.depth > 0 => {
                self.depth -= 1;
                if self.depth == 0 {
                    return Scan::Last;
                }
            }
            // A number or literal ends at the first character that cannot continue it.
            ',' | '}' | ']' if !first && self.depth == 0 => return Scan::After,
            c if c.is_whitespace() && self.depth == 0 && !first => return Scan::After,
            _ => {}
        }
        Scan::Inside
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["get_weather".into(), "get_time".into()]
    }

    const ARRAY_IN_FENCE: &str = "```json\n[{\"name\": \"get_time\", \"arguments\": {\"city\": \"Oslo\"}}, {\"name\":\"get_weather\",\"parameters\":{\"city\":\"a}\\\"b\"}}]\n```";
    const TEXT_THEN_CALLS: &str = "Let me look.\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}\n{\"name\": \"get_time\"}\nDone.";
    const NOT_CALLS: [&str; 4] = [
        "It is {\"name\": \"get_weather\"} in text, and\n{not a call}\n",
        "  \n{\"name\": \"launch\", \"parameters\": {}}",
        "{\"name\": \"get_wea",
        "```python\nprint(1)\n```",
    ];

    /// Feeds `reply` in pieces of `size` characters and collects the events.
    fn feed_in_pieces(reply: &str, size: usize) -> (Vec<CallEvent>, Vec<ParsedCall>) {
        let mut parser = CallParser::new(names());
        let mut events = Vec::new();
        let chars: Vec<char> = reply.chars().collect();
        for piece in chars.chunks(size) {
            events.extend(parser.push(&piece.iter().collect::<String>()));
        }
        events.extend(parser.finish());
        (events, parser.calls().to_vec())
    }

    fn text_of(events: &[CallEvent]) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                CallEvent::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    fn arguments_of(events: &[CallEvent], index: usize) -> String {
        events
            .iter()
            .filter_map(|e| match e {
                CallEvent::Arguments { index: i, fragment } if *i == index => {
                    Some(fragment.as_str())
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_call_streams_its_arguments_piece_by_piece() {
        let reply = r#"{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, 2]}}"#;
        let (events, calls) = feed_in_pieces(reply, 3);
        assert_eq!(
            events[0],
            CallEvent::Start {
                index: 0,
                name: "get_weather".into()
            }
        );
        let fragments = events
            .iter()
            .filter(|e| matches!(e, CallEvent::Arguments { .. }))
            .count();
        assert!(fragments > 5, "{events:?}");
        let args = arguments_of(&events, 0);
        assert_eq!(args, r#"{"city": "Paris", "days": [1, 2]}"#);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].arguments, args);
        assert!(calls[0].complete);
        assert_eq!(text_of(&events), "");
    }

    #[test]
    fn any_chunking_gives_the_same_result_as_the_whole_reply() {
        let mut replies = vec![
            ARRAY_IN_FENCE,
            TEXT_THEN_CALLS,
            "{\"name\": \"get_time\", \"parameters\": 42}",
            "Ünïcödé ✓\n{\"name\": \"get_time\", \"parameters\": {\"city\": \"Zürich ✓\"}}",
        ];
        replies.extend(NOT_CALLS);
        for reply in replies {
            let (whole_text, whole_calls) = CallParser::new(names()).parse_all(reply);
            for size in [1, 2, 5, 17] {
                let (events, calls) = feed_in_pieces(reply, size);
                assert_eq!(
                    text_of(&events),
                    whole_text,
                    "{reply:?} in pieces of {size}"
                );
                assert_eq!(calls, whole_calls, "{reply:?} in pieces of {size}");
                for (i, call) in calls.iter().enumerate() {
                    assert_eq!(arguments_of(&events, i), call.arguments);
                }
            }
        }
    }

    #[test]
    fn calls_text_and_framing_are_told_apart() {
        let (text, calls) = CallParser::new(names()).parse_all(ARRAY_IN_FENCE);
        assert_eq!(text, "");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_time");
        assert_eq!(calls[0].arguments, r#"{"city": "Oslo"}"#);
        assert_eq!(calls[1].arguments, r#"{"city":"a}\"b"}"#);
        assert!(calls.iter().all(|c| c.complete));

        let (text, calls) = CallParser::new(names()).parse_all(TEXT_THEN_CALLS);
        assert_eq!(text, "Let me look.\nDone.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].arguments, r#"{"city": "Rome"}"#);
        assert_eq!(calls[1].arguments, "{}");

        let (text, calls) =
            CallParser::new(names()).parse_all("{\"name\": \"get_time\", \"parameters\": 42}");
        assert_eq!((text.as_str(), calls[0].arguments.as_str()), ("", "42"));
    }

    #[test]
    fn unknown_tools_mid_line_objects_and_code_are_text() {
        for reply in NOT_CALLS {
            let (text, calls) = CallParser::new(names()).parse_all(reply);
            assert_eq!(text, reply);
            assert!(calls.is_empty(), "{reply:?}");
        }
    }

    #[test]
    fn a_cut_off_call_is_incomplete() {
        let (text, calls) = CallParser::new(names())
            .parse_all(r#"{"name": "get_time", "parameters": {"city": "Os"#);
        assert_eq!(text, "");
        assert_eq!(calls[0].arguments, r#"{"city": "Os"#);
        assert!(!calls[0].complete);
    }

    #[test]
    fn plain_text_streams_without_waiting_for_the_end() {
        let mut parser = CallParser::new(names());
        assert_eq!(parser.push("Hello"), vec![CallEvent::Text("Hello".into())]);
        assert_eq!(
            parser.push(" there\n"),
            vec![CallEvent::Text(" there\n".into())]
        );
        // A new line may start a call: held until it cannot.
        assert_eq!(parser.push("{\"na"), vec![]);
        assert_eq!(
            parser.push("me\": 1"),
            vec![CallEvent::Text("{\"name\": 1".into())]
        );
    }
}
