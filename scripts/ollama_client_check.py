#!/usr/bin/env python3
"""Drives a running `gemma serve` with the official `ollama` Python client: list, show, ps,
chat (plain and streamed, which must agree), generate with a JSON schema `format` (validated
with `jsonschema`), a tool call whose `message.tool_calls` the client parses, and an unknown
model (`ollama.ResponseError` with status 404).
Run by `crates/server/tests/ollama.rs`, or by hand: ollama_client_check.py [HOST]
Exits non-zero on the first failed check."""

import json
import sys

import jsonschema
import ollama

host = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:11434"
client = ollama.Client(host=host)


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + (f": {detail}" if detail and not ok else ""))
    if not ok:
        sys.exit(1)


listed = client.list()
check("list has one model", len(listed.models) == 1, listed)
model = listed.models[0].model
check("list details", listed.models[0].details.format == "gguf" and listed.models[0].size > 0
      and len(listed.models[0].digest) == 64, listed)

shown = client.show(model)
check("show capabilities", "completion" in shown.capabilities and "tools" in shown.capabilities,
      shown)
check("show model_info", shown.modelinfo["general.architecture"] == shown.details.family, shown)
check("show template", bool(shown.template) and bool(shown.parameters), shown)
check("show without tag", client.show(model.removesuffix(":latest")).details == shown.details)

running = client.ps()
check("ps", len(running.models) == 1 and running.models[0].model == model, running)

greedy = {"temperature": 0, "num_predict": 8}
messages = [{"role": "user", "content": "Name a color."}]
r = client.chat(model=model, messages=messages, options=greedy)
check("chat", r.done and r.message.role == "assistant" and r.message.content, r)
check("chat counts", 0 < r.eval_count <= 8 and r.prompt_eval_count > 0, r)
check("chat durations", r.total_duration > 0 and r.eval_duration > 0
      and r.prompt_eval_duration > 0 and r.load_duration > 0, r)

parts = list(client.chat(model=model, messages=messages, options=greedy, stream=True))
streamed = "".join(p.message.content or "" for p in parts)
check("chat stream ends once", [p.done for p in parts].count(True) == 1 and parts[-1].done, parts)
check("chat stream equals non-stream", streamed == r.message.content, (streamed, r.message.content))
check("chat stream counts", parts[-1].eval_count == r.eval_count, parts[-1])

schema = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "likes": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["name", "age", "likes"],
}
g = client.generate(model=model, prompt="Describe a person as JSON.", format=schema,
                    options={"temperature": 0, "num_predict": 200})
check("generate format done", g.done and g.done_reason == "stop", g)
try:
    value = json.loads(g.response)
    jsonschema.validate(value, schema)
    valid = True
except Exception as e:  # noqa: BLE001
    valid = str(e)
check("generate format validates", valid is True, (valid, g.response))
check("generate context", isinstance(g.context, list) and len(g.context) > g.prompt_eval_count - 1,
      g.context)

gs = list(client.generate(model=model, prompt="Say hi.", options=greedy, stream=True))
check("generate stream", gs[-1].done and "".join(p.response for p in gs) != "", gs)

tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
}]
# The 270M model answers a bare question with text; after one call and its result in the
# conversation (which also sends a call back in Ollama's shape), it calls again (greedy).
conversation = [
    {"role": "user", "content": "What is the weather in Berlin?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Berlin"}}}]},
    {"role": "tool", "content": "12 degrees", "tool_name": "get_weather"},
    {"role": "user", "content": "And in Paris?"},
]
t = client.chat(model=model, tools=tools, options={"temperature": 0, "num_predict": 60},
                messages=conversation)
calls = t.message.tool_calls or []
check("tool call parsed", len(calls) >= 1 and calls[0].function.name == "get_weather"
      and calls[0].function.arguments.get("city") == "Paris", t.message)
streamed_calls = [c for p in client.chat(model=model, tools=tools, stream=True,
                                         options={"temperature": 0, "num_predict": 60},
                                         messages=conversation)
                  for c in (p.message.tool_calls or [])]
check("streamed tool call", [c.function for c in streamed_calls] == [c.function for c in calls],
      streamed_calls)
follow = client.chat(model=model, tools=tools, options=greedy, messages=conversation + [
    t.message,
    {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"},
])
check("tool result answered", follow.done, follow)

try:
    client.chat(model="no-such-model", messages=messages)
    check("unknown model raises", False)
except ollama.ResponseError as e:
    check("unknown model is 404", e.status_code == 404 and "not found" in e.error, e)

print("all checks passed")
