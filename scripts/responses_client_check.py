#!/usr/bin/env python3
"""Drives `POST /v1/responses` of a running `gemma serve` with the official `openai` Python
client: `responses.create` plain and streamed (the deltas joined must equal the completed
response's text), a `json_schema` text format whose output validates with `jsonschema`,
`responses.parse(text_format=...)` with a pydantic model, and a function call round trip.
Run by `crates/server/tests/responses.rs`, or by hand: responses_client_check.py [BASE_URL]
Exits non-zero on the first failed check."""

import json
import sys

import jsonschema
import openai
from pydantic import BaseModel, Field

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/v1"
client = openai.OpenAI(base_url=base, api_key="unused")
model = client.models.list().data[0].id


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + (f": {detail}" if detail and not ok else ""))
    if not ok:
        sys.exit(1)


r = client.responses.create(model=model, input="Name a color.", max_output_tokens=8,
                            temperature=0)
check("create", r.status in ("completed", "incomplete") and r.output_text, r)
check("create ids", r.id.startswith("resp_") and r.output[0].id.startswith("msg_"), r)
check("create usage", r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
      and 0 < r.usage.output_tokens <= 8, r.usage)

stream = client.responses.create(model=model, input="Name a color.", max_output_tokens=8,
                                 temperature=0, stream=True)
deltas, final, kinds, seqs = [], None, [], []
for event in stream:
    kinds.append(event.type)
    seqs.append(event.sequence_number)
    if event.type == "response.output_text.delta":
        deltas.append(event.delta)
    if event.type in ("response.completed", "response.incomplete"):
        final = event.response
check("stream starts", kinds[:2] == ["response.created", "response.in_progress"], kinds)
check("stream completes", final is not None and kinds[-1] == "response." + final.status, kinds)
check("stream sequence", seqs == list(range(len(seqs))), seqs)
check("stream deltas join to the text", "".join(deltas) == final.output_text, (deltas, final))
check("stream equals non-stream", final.output_text == r.output_text, final.output_text)
for needed in ["response.output_item.added", "response.content_part.added",
               "response.output_text.done", "response.content_part.done",
               "response.output_item.done"]:
    check("stream has " + needed, needed in kinds, kinds)

schema = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0},
        "sights": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 2},
    },
    "required": ["city", "population", "sights"],
    "additionalProperties": False,
}
j = client.responses.create(
    model=model, input="Describe Paris as JSON.", temperature=0, max_output_tokens=200,
    text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}})
check("json_schema completed", j.status == "completed", j)
try:
    jsonschema.validate(json.loads(j.output_text), schema)
    valid = True
except Exception as e:  # noqa: BLE001
    valid = str(e)
check("json_schema validates", valid is True, (valid, j.output_text))


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int


if hasattr(client.responses, "parse"):
    p = client.responses.parse(model=model, input="Invent a person.", temperature=0,
                               max_output_tokens=100, text_format=Person)
    check("parse", isinstance(p.output_parsed, Person), p)
else:
    print("skip parse (not in this client)")

tools = [{
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    },
}]
question = [{"role": "user", "content": "What is the weather in Paris?"}]
c = client.responses.create(model=model, input=question, tools=tools, tool_choice="required",
                            temperature=0, max_output_tokens=60)
calls = [o for o in c.output if o.type == "function_call"]
check("function call", len(calls) == 1 and calls[0].name == "get_weather"
      and "city" in json.loads(calls[0].arguments), c.output)
follow = client.responses.create(
    model=model, tools=tools, temperature=0, max_output_tokens=20,
    input=question + [
        {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name,
         "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id,
         "output": "18 degrees and sunny"},
    ])
check("function output answered", follow.output_text is not None and follow.status, follow)

print("all checks passed")
