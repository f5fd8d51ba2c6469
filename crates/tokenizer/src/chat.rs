//! Chat templates: Jinja templates from model files rendered with minijinja the way Hugging
//! Face `apply_chat_template` renders them with Jinja2, and a built-in Gemma 3 template for
//! files that carry none.

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::syntax::SyntaxConfig;
use minijinja::{context, Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::TokenizerError;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

const TEMPLATE_NAME: &str = "chat";
const ALTERNATION_ERROR: &str =
    "Conversation roles must alternate user/assistant/user/assistant/...";

/// A chat template ready to render.
#[derive(Debug)]
pub struct ChatTemplate {
    kind: TemplateKind,
}

#[derive(Debug)]
enum TemplateKind {
    /// Gemma 3's official template, in Rust.
    Gemma3 { bos_token: String },
    Jinja {
        env: Box<Environment<'static>>,
        bos_token: String,
        eos_token: String,
        /// The template's text, as given.
        source: String,
    },
}

impl ChatTemplate {
    /// Compiles a Jinja chat template (e.g. `tokenizer.chat_template` from GGUF or
    /// `chat_template` from `tokenizer_config.json`). A syntax error is reported here.
    pub fn new(
        source: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, TokenizerError> {
        let mut env = Environment::new();
        // transformers compiles chat templates with trim_blocks and lstrip_blocks on.
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TokenizerError::TemplateSyntax(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("trim", python_trim);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(source))
            .map_err(|e| TokenizerError::TemplateSyntax(describe(&e)))?;
        Ok(ChatTemplate {
            kind: TemplateKind::Jinja {
                env: Box::new(env),
                bos_token: bos_token.to_owned(),
                eos_token: eos_token.to_owned(),
                source: source.to_owned(),
            },
        })
    }

    /// Gemma 3's official chat template, for models whose files carry none:
    /// `<bos>`, then per turn `<start_of_turn>{user|model}\n{content, trimmed}<end_of_turn>\n`;
    /// a leading system message is prepended (untrimmed, plus `\n\n`) to the first turn's
    /// content; roles must alternate starting with `user`.
    pub fn gemma3_builtin() -> ChatTemplate {
        ChatTemplate {
            kind: TemplateKind::Gemma3 {
                bos_token: "<bos>".to_owned(),
            },
        }
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        match &self.kind {
            TemplateKind::Gemma3 { bos_token } => {
                render_gemma3(bos_token, messages, add_generation_prompt)
            }
            TemplateKind::Jinja { .. } => {
                let messages: Vec<Value> = messages
                    .iter()
                    .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
                    .collect();
                self.render_values(Value::from(messages), add_generation_prompt)
            }
        }
    }

    /// The Jinja source, for templates read from a model file (`None` for the built-in one).
    pub fn source(&self) -> Option<&str> {
        match &self.kind {
            TemplateKind::Gemma3 { .. } => None,
            TemplateKind::Jinja { source, .. } => Some(source),
        }
    }

    /// Renders a Jinja template with `messages` as any JSON-like value: content as a list of
    /// typed parts (`{"type": "image"}`, `{"type": "text", "text": ...}`), as transformers'
    /// processors pass it. The built-in Gemma 3 template takes only text messages.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        self.render_values(
            Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt,
        )
    }

    fn render_values(
        &self,
        messages: Value,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let TemplateKind::Jinja {
            env,
            bos_token,
            eos_token,
            ..
        } = &self.kind
        else {
            return Err(TokenizerError::TemplateRender(
                "the built-in Gemma 3 template renders text messages only".to_owned(),
            ));
        };
        let template = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TokenizerError::TemplateRender(describe(&e)))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token.as_str(),
                eos_token => eos_token.as_str(),
            })
            .map_err(|e| TokenizerError::TemplateRender(describe(&e)))
    }
}

fn render_gemma3(
    bos_token: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String, TokenizerError> {
    let (first_user_prefix, turns) = match messages.first() {
        None => {
            return Err(TokenizerError::TemplateRender(
                "no messages to render".to_owned(),
            ))
        }
        Some(first) if first.role == "system" => (format!("{}\n\n", first.content), &messages[1..]),
        Some(_) => (String::new(), messages),
    };
    let mut out = String::from(bos_token);
    for (index, message) in turns.iter().enumerate() {
        if (message.role == "user") != (index % 2 == 0) {
            return Err(TokenizerError::TemplateRender(ALTERNATION_ERROR.to_owned()));
        }
        let role = if message.role == "assistant" {
            "model"
        } else {
            &message.role
        };
        out.push_str("<start_of_turn>");
        out.push_str(role);
        out.push('\n');
        if index == 0 {
            out.push_str(&first_user_prefix);
        }
        out.push_str(trim_python_whitespace(&message.content));
        out.push_str("<end_of_turn>\n");
    }
    if add_generation_prompt {
        out.push_str("<start_of_turn>model\n");
    }
    Ok(out)
}

/// minijinja's error with its source chain, which carries the template's own message.
fn describe(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `str.strip()` whitespace: Unicode White_Space plus the ASCII separators
/// U+001C..U+001F, which Python also counts as space.
fn is_python_whitespace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn trim_python_whitespace(s: &str) -> &str {
    s.trim_matches(is_python_whitespace)
}

/// Jinja2's `trim` filter (Python `str.strip`), which minijinja's differs from slightly.
fn python_trim(value: String, chars: Option<String>) -> String {
    match chars {
        Some(chars) => value.trim_matches(|c| chars.contains(c)).to_owned(),
        None => trim_python_whitespace(&value).to_owned(),
    }
}

/// Hugging Face's `{% generation %}` / `{% endgeneration %}` (marking assistant text for
/// training masks) are not Jinja; they become `{% if true %}` / `{% endif %}`, keeping any
/// whitespace-control dashes.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        out.push_str(&rest[..open]);
        let tag = &rest[open..];
        // Search after the opening `{%`: in `{%}` the `%` must not close the tag too.
        let Some(close) = tag[2..].find("%}").map(|i| i + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..close];
        let left_dash = inner.starts_with(['-', '+']);
        let right_dash = inner.ends_with(['-', '+']);
        let word = inner.trim_matches(['-', '+']).trim();
        let replacement = match word {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(statement) => {
                out.push_str("{%");
                if left_dash {
                    out.push_str(&inner[..1]);
                }
                out.push(' ');
                out.push_str(statement);
                out.push(' ');
                if right_dash {
                    out.push_str(&inner[inner.len() - 1..]);
                }
                out.push_str("%}");
            }
            None => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    out
}

/// `strftime_now(format)`: the current UTC time, for templates that print today's date.
fn strftime_now(format: String) -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_utc(seconds, &format)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// C `strftime` for the common conversions (`%Y %y %m %d %e %j %H %I %M %S %p %B %b %A %a
/// %%`); any other conversion is copied through unchanged.
fn format_utc(unix_seconds: i64, format: &str) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let second_of_day = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let (hour, minute, second) = (
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
    );

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        let piece = match spec {
            'Y' => year.to_string(),
            'y' => format!("{:02}", year.rem_euclid(100)),
            'm' => format!("{month:02}"),
            'd' => format!("{day:02}"),
            'e' => format!("{day:>2}"),
            'j' => format!("{day_of_year:03}"),
            'H' => format!("{hour:02}"),
            'I' => format!("{:02}", (hour + 11) % 12 + 1),
            'M' => format!("{minute:02}"),
            'S' => format!("{second:02}"),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_owned(),
            'B' => MONTHS[month as usize - 1].to_owned(),
            'b' => MONTHS[month as usize - 1][..3].to_owned(),
            'A' => WEEKDAYS[weekday].to_owned(),
            'a' => WEEKDAYS[weekday][..3].to_owned(),
            '%' => "%".to_owned(),
            other => format!("%{other}"),
        };
        out.push_str(&piece);
    }
    out
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31), proleptic Gregorian. Works in
/// 400-year eras starting on March 1st so that the leap day falls at the end of a year.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let shifted = days + 719_468; // days from 0000-03-01
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_format_like_strftime() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(format_utc(t, "%Y-%m-%d %H:%M:%S"), "2024-02-29 13:05:09");
        assert_eq!(
            format_utc(t, "%d %b %Y, %A (%a) %B %j %I%p %y %% %Q"),
            "29 Feb 2024, Thursday (Thu) February 060 01PM 24 % %Q"
        );
        assert_eq!(format_utc(0, "%Y-%m-%d %A"), "1970-01-01 Thursday");
        for days in [-800_000, -1, 0, 59, 60, 11_016, 19_782, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn generation_tags_become_plain_jinja() {
        let src = "a{% generation %}b{%- endgeneration -%}c{% if x %}{% endif %}";
        assert_eq!(
            rewrite_generation_tags(src),
            "a{% if true %}b{%- endif -%}c{% if x %}{% endif %}"
        );
    }

    #[test]
    fn python_trim_strips_ascii_separators() {
        assert_eq!(
            trim_python_whitespace("\u{1f}\u{a0} hi \u{3000}\u{1c}"),
            "hi"
        );
        assert_eq!(python_trim("xxhixx".into(), Some("x".into())), "hi");
    }
}
