#!/usr/bin/env python3
"""Drives a running `gemma serve` with the official `openai` Python client: chat, streaming,
a tool call round trip (plain and streamed), `json_schema` output for 20 random schemas
(nested objects, arrays, enums, numbers), each validated with `jsonschema`, and
`chat.completions.parse()` with unbounded pydantic models (ints, floats, nested models, lists,
enums, optionals), greedy and sampled. With a second server running a Gemma 3 vision model:
image requests (one image, two in one message, streamed, pan-and-scan, bad images) with base64
data URLs of the fixture images.
Run by `crates/server/tests/openai_client.rs` (which makes a venv with `openai` and
`jsonschema`), or by hand: openai_client_check.py [BASE_URL [VISION_BASE_URL IMAGE_DIR]]
Exits non-zero on the first failed check."""

import base64
import json
import os
import random
import sys
from enum import Enum
from typing import Optional

import jsonschema
import openai
from pydantic import BaseModel

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/v1"
# A second server, with a Gemma 3 vision model, and the folder of the test images.
vision_base = sys.argv[2] if len(sys.argv) > 2 else None
image_dir = sys.argv[3] if len(sys.argv) > 3 else None
client = openai.OpenAI(base_url=base, api_key="unused")


def check(name, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + name + (f": {detail}" if detail and not ok else ""))
    if not ok:
        sys.exit(1)


models = client.models.list()
check("models.list", len(models.data) == 1)
model = models.data[0].id

r = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Name a color."}], max_tokens=6, temperature=0
)
check("chat non-stream", r.choices[0].message.content and r.usage.completion_tokens <= 6, r)
check("usage total", r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens)

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Name a color."}],
    max_tokens=6,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
text, usage = "", None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage
check("chat stream equals non-stream", text == r.choices[0].message.content, text)
check("stream usage", usage is not None and usage.completion_tokens == r.usage.completion_tokens)

tools = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]
messages = [{"role": "user", "content": "What is the weather in Paris?"}]
r = client.chat.completions.create(
    model=model, messages=messages, tools=tools, tool_choice="required", max_tokens=40, temperature=0
)
call = r.choices[0].message.tool_calls[0]
check("tool call", r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather", r)
check("tool call arguments", isinstance(json.loads(call.function.arguments).get("city"), str))
messages += [r.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
r = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="none", max_tokens=8)
check("tool result round trip", isinstance(r.choices[0].message.content, str), r)

# A streamed tool call, accumulated the way OpenAI's docs show: the first delta of a call
# carries its id, type and name; later deltas append to function.arguments.
oslo = dict(
    model=model,
    messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
    tools=tools,
    tool_choice={"type": "function", "function": {"name": "get_weather"}},
    max_tokens=40,
    temperature=0,
)
plain = client.chat.completions.create(**oslo)
stream = client.chat.completions.create(**oslo, stream=True)
calls, finish, argument_chunks = {}, None, 0
for chunk in stream:
    d = chunk.choices[0].delta if chunk.choices else None
    for tc in (d.tool_calls or []) if d else []:
        if tc.index not in calls:
            calls[tc.index] = {"id": tc.id, "type": tc.type, "name": tc.function.name, "arguments": ""}
        elif tc.id is not None:
            check("only a call's first delta has its id", False, tc)
        if tc.function and tc.function.arguments:
            calls[tc.index]["arguments"] += tc.function.arguments
            argument_chunks += 1
    if chunk.choices and chunk.choices[0].finish_reason:
        finish = chunk.choices[0].finish_reason
check("streamed tool call", list(calls) == [0] and finish == "tool_calls", calls)
call = calls[0]
check("streamed call id and name", call["id"].startswith("call_") and call["type"] == "function"
      and call["name"] == "get_weather", call)
check("arguments streamed in pieces", argument_chunks > 1, argument_chunks)
check("streamed arguments equal the non-stream ones",
      call["arguments"] == plain.choices[0].message.tool_calls[0].function.arguments, call)
check("streamed arguments are JSON", isinstance(json.loads(call["arguments"]).get("city"), str), call)

schema = {
    "type": "object",
    # Bounded so that a sampled answer always fits in max_tokens (an unbounded integer can
    # run on until the token limit cuts the document).
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Invent a person."}],
    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    max_tokens=60,
)
check("json_schema complete", r.choices[0].finish_reason == "stop", r)
person = json.loads(r.choices[0].message.content)
check("json_schema", set(person) == {"name", "age"} and isinstance(person["age"], int), person)



def random_schema(rng, depth=0):
    """A random object schema: numbers, enums, strings, arrays, nested objects. Every part is
    bounded so that a conforming document always fits in max_tokens."""
    names = ["name", "age", "city", "score", "color", "tags", "size", "info", "ok", "level"]
    props = {}
    for key in rng.sample(names, rng.randint(1, 3)):
        kind = rng.choice(["integer", "number", "enum", "string", "boolean", "array", "object"])
        if kind == "object" and depth >= 1:
            kind = "integer"
        if kind == "integer":
            props[key] = {"type": "integer", "minimum": -50, "maximum": 500}
        elif kind == "number":
            props[key] = {"type": "number", "minimum": 0, "maximum": 10}
        elif kind == "enum":
            props[key] = {"enum": rng.sample(["red", "green", "blue", "small", "large", 7], 3)}
        elif kind == "string":
            props[key] = {"type": "string", "maxLength": 10}
        elif kind == "boolean":
            props[key] = {"type": "boolean"}
        elif kind == "array":
            item = rng.choice([{"type": "integer", "minimum": 0, "maximum": 99},
                               {"enum": ["a", "b", "c"]},
                               {"type": "string", "maxLength": 6}])
            props[key] = {"type": "array", "items": item, "maxItems": 3}
        else:
            props[key] = random_schema(rng, depth + 1)
    return {"type": "object", "properties": props, "required": sorted(props),
            "additionalProperties": False}


rng = random.Random(20261130)
valid = 0
for i in range(20):
    schema = random_schema(rng)
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Fill in record number {i}."}],
        response_format={"type": "json_schema", "json_schema": {"name": f"record{i}", "schema": schema}},
        max_tokens=160,
        temperature=0.8,
        seed=i,
    )
    content = r.choices[0].message.content
    try:
        jsonschema.validate(json.loads(content), schema)
        valid += 1
    except (ValueError, jsonschema.ValidationError) as e:
        print(f"schema {i}: {json.dumps(schema)}\noutput: {content!r}\nerror: {e}")
check("20 random json_schema outputs validate with jsonschema", valid == 20, f"{valid} of 20")

# `chat.completions.parse()` with pydantic models as users write them: integers, floats,
# nested models, lists of integers and enums, optionals, none of them bounded. The client sends strict
# schemas (`additionalProperties: false`); every answer must end by itself and parse.
class City(BaseModel):
    name: str
    population: int
    area_km2: float


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    street: str
    city: str
    zip_code: str


class Person(BaseModel):
    name: str
    age: int
    favorite_color: Color
    address: Address


class Stats(BaseModel):
    values: list[int]
    mean: float
    colors: list[Color]
    note: Optional[str]


# No list of objects: this small model repeats list items (greedy or sampled) until the
# server's default cap of 32 items, which takes more than 400 tokens when items are objects.
parse_cases = [
    ("Describe the city of Lyon.", City, (0, None)),
    ("Invent a person.", Person, (0, None)),
    ("Give me some numbers and their mean.", Stats, (0, None)),
]
for n, (prompt, response_model, temperatures) in enumerate(parse_cases):
    for temperature in temperatures:
        name = f"parse() {response_model.__name__} temperature={temperature}"
        sampling = {} if temperature is None else {"temperature": temperature}
        try:
            r = client.chat.completions.parse(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                response_format=response_model,
                max_tokens=400,
                seed=n,
                **sampling,
            )
        except Exception as e:  # LengthFinishReasonError, pydantic.ValidationError
            check(name, False, f"{type(e).__name__}: {e}")
        message = r.choices[0].message
        check(name, isinstance(message.parsed, response_model) and r.choices[0].finish_reason == "stop",
              message.content)

r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=3, temperature=0)
check("completions", r.choices[0].text is not None and r.usage.completion_tokens <= 3)

try:
    client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
            }
        ],
    )
    check("image to a text-only model rejected", False)
except openai.BadRequestError as e:
    check("image to a text-only model rejected with 400",
          e.status_code == 400 and "takes no images" in str(e), e)

if vision_base:
    # Images, sent as base64 data URLs the way OpenAI's vision guide shows, to a server running
    # a Gemma 3 model with a vision tower.
    vclient = openai.OpenAI(base_url=vision_base, api_key="unused")
    vmodel = vclient.models.list().data[0].id

    def image_url(name):
        with open(os.path.join(image_dir, name), "rb") as f:
            data = base64.b64encode(f.read()).decode()
        return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}", "detail": "low"}}

    def ask(content, **kw):
        return vclient.chat.completions.create(
            model=vmodel, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0, **kw
        )

    text_only = ask([{"type": "text", "text": "What is in this picture?"}])
    one = ask([{"type": "text", "text": "What is in this picture?"}, image_url("img_a_97x73.png")])
    check("image request", isinstance(one.choices[0].message.content, str)
          and one.choices[0].finish_reason in ("stop", "length"), one)
    # Each image of the tiny model is 16 soft tokens between its start and end tokens.
    check("image tokens counted in usage", one.usage.prompt_tokens >= text_only.usage.prompt_tokens + 18,
          (one.usage, text_only.usage))
    two = ask([
        image_url("img_a_97x73.png"),
        {"type": "text", "text": "Compare this picture with"},
        image_url("img_b1_64x64.png"),
    ])
    check("two images in one message", isinstance(two.choices[0].message.content, str)
          and two.usage.prompt_tokens >= one.usage.prompt_tokens + 18, two)

    content = [{"type": "text", "text": "Describe"}, image_url("img_b3_150x90.png")]
    plain = ask(content)
    stream = ask(content, stream=True, stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage:
            usage = chunk.usage
    check("streamed image request equals non-stream", text == plain.choices[0].message.content
          and finish == plain.choices[0].finish_reason, (text, plain))
    check("streamed image usage", usage is not None and usage.prompt_tokens == plain.usage.prompt_tokens
          and usage.completion_tokens == plain.usage.completion_tokens, usage)

    wide = [image_url("img_c_800x300.png"), {"type": "text", "text": "Describe"}]
    crops = ask(wide, extra_body={"pan_and_scan": True})
    check("pan_and_scan adds crops", crops.usage.prompt_tokens >= ask(wide).usage.prompt_tokens + 3 * 16,
          crops.usage)

    with open(os.path.join(image_dir, "img_a_97x73.png"), "rb") as f:
        half = base64.b64encode(f.read()[:5000]).decode()
    for url, words in [
        (f"data:image/png;base64,{half}", "corrupt or truncated"),
        ("https://example.com/cat.png", "remote image URLs are not fetched"),
    ]:
        try:
            ask([{"type": "image_url", "image_url": {"url": url}}])
            check(f"bad image {url[:20]} rejected", False)
        except openai.BadRequestError as e:
            check(f"bad image {url[:20]} rejected with 400", e.status_code == 400 and words in str(e)
                  and e.body.get("param") == "messages[0].content[0].image_url", e)

print("all checks passed")
