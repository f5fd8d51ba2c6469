//! Function calling the way Gemma 3's guidance describes it: the function definitions and
//! the call format go into the prompt, the model answers with
//! `{"name": ..., "parameters": {...}}`, and tool results come back as a user turn.

use serde_json::{json, Map, Value};

use crate::api::{Tool, ToolCall, ToolChoice};
use crate::error::ApiError;

/// What the request allows or demands.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// No tools offered (or `tool_choice: "none"`).
    Off,
    /// The model may call one of the tools or answer in text.
    Auto,
    /// The model must call one of these tools; the output is constrained to parse.
    Required(Vec<String>),
}

pub fn tool_mode(tools: &[Tool], choice: Option<&ToolChoice>) -> Result<ToolMode, ApiError> {
    for tool in tools {
        if tool.kind != "function" {
            return Err(ApiError::bad_request(format!(
                "tool type {:?} is not supported; only \"function\"",
                tool.kind
            ))
            .with_param("tools"));
        }
    }
    let names = || tools.iter().map(|t| t.function.name.clone()).collect();
    if tools.is_empty() {
        return match choice {
            None => Ok(ToolMode::Off),
            Some(ToolChoice::Mode(m)) if m == "none" || m == "auto" => Ok(ToolMode::Off),
            Some(_) => Err(
                ApiError::bad_request("tool_choice needs a non-empty tools list")
                    .with_param("tool_choice"),
            ),
        };
    }
    let mode = match choice {
        None => ToolMode::Auto,
        Some(ToolChoice::Mode(m)) => match m.as_str() {
            "none" => ToolMode::Off,
            "auto" => ToolMode::Auto,
            "required" => ToolMode::Required(names()),
            other => {
                return Err(ApiError::bad_request(format!(
                    "tool_choice {other:?} is not one of \"none\", \"auto\", \"required\""
                ))
                .with_param("tool_choice"))
            }
        },
        Some(ToolChoice::Named(named)) => {
            let wanted = &named.function.name;
            if !tools.iter().any(|t| &t.function.name == wanted) {
                return Err(ApiError::bad_request(format!(
                    "tool_choice names {wanted:?}, which is not in tools"
                ))
                .with_param("tool_choice"));
            }
            ToolMode::Required(vec![wanted.clone()])
        }
    };
    Ok(mode)
}

/// The instructions and definitions placed before the conversation.
pub fn tools_preamble(tools: &[Tool]) -> String {
    let definitions: Vec<Value> = tools
        .iter()
        .map(|t| serde_json::to_value(&t.function).unwrap_or(Value::Null))
        .collect();
    format!(
        "You have access to functions. If you decide to invoke any of the function(s), you MUST \
         put it in the format of\n{{\"name\": function name, \"parameters\": dictionary of \
         argument name and its value}}\n\nYou SHOULD NOT include any other text in the response \
         if you call a function\n{}\n",
        serde_json::to_string_pretty(&definitions).unwrap_or_default()
    )
}

/// How an earlier assistant call is written back into the prompt.
pub fn render_calls(calls: &[ToolCall]) -> String {
    calls
        .iter()
        .map(|c| {
            let parameters: Value =
                serde_json::from_str(&c.function.arguments).unwrap_or(Value::Object(Map::new()));
            json!({"name": c.function.name, "parameters": parameters}).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// How a tool result is written into the prompt (as part of a user turn).
pub fn render_tool_result(name: Option<&str>, content: &str) -> String {
    match name {
        Some(name) => format!("```tool_output\n{name}: {content}\n```"),
        None => format!("```tool_output\n{content}\n```"),
    }
}

/// Checks every tool's `parameters` the way [`call_schema`] prepares them (references,
/// recursion), whatever `tool_choice` says: a schema no call could satisfy is the client's
/// error even when the model is not forced to call.
pub fn check_parameters(tools: &[Tool]) -> Result<(), String> {
    for (i, t) in tools.iter().enumerate() {
        if let Some(parameters) = &t.function.parameters {
            crate::schema::normalize(parameters, "check_")
                .map_err(|e| format!("tools[{i}] ({}): {e}", t.function.name))?;
        }
    }
    Ok(())
}

/// A schema every allowed call satisfies; used to constrain output when a call is required.
/// Each tool's `parameters` is normalized on its own (its `$ref`s are relative to it) by
/// [`crate::schema::normalize`]; the error names the tool.
pub fn call_schema(tools: &[Tool], allowed: &[String]) -> Result<Value, String> {
    let mut defs = Map::new();
    let mut variants = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        if !allowed.contains(&t.function.name) {
            continue;
        }
        let parameters = t
            .function
            .parameters
            .clone()
            .unwrap_or_else(|| json!({"type": "object"}));
        let normalized = crate::schema::normalize(&parameters, &format!("tool{i}_"))
            .map_err(|e| format!("tools[{i}] ({}): {e}", t.function.name))?;
        defs.extend(normalized.defs);
        let mut parameters = normalized.root;
        if let Some(object) = parameters.as_object_mut() {
            object.retain(|key, _| key != "$schema" && key != "x-guidance");
        }
        variants.push(json!({
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "parameters": parameters,
            },
            "required": ["name", "parameters"],
            "additionalProperties": false,
        }));
    }
    let mut schema = if variants.len() == 1 {
        variants.into_iter().next().unwrap_or(Value::Null)
    } else {
        json!({"anyOf": variants})
    };
    if !defs.is_empty() {
        schema["$defs"] = Value::Object(defs);
    }
    Ok(schema)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather_tool() -> Tool {
        serde_json::from_value(json!({"type": "function", "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}
        }}))
        .unwrap()
    }

    #[test]
    fn choice_validation() {
        let tools = [weather_tool()];
        assert_eq!(tool_mode(&tools, None).unwrap(), ToolMode::Auto);
        let named: ToolChoice =
            serde_json::from_value(json!({"type": "function", "function": {"name": "nope"}}))
                .unwrap();
        assert!(tool_mode(&tools, Some(&named)).is_err());
        let required = ToolChoice::Mode("required".into());
        assert_eq!(
            tool_mode(&tools, Some(&required)).unwrap(),
            ToolMode::Required(vec!["get_weather".into()])
        );
        assert!(tool_mode(&[], Some(&required)).is_err());
    }
}
