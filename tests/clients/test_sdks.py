#!/usr/bin/env python3
"""The official anthropic and openai Python SDKs against a running switchboard.

Written as a user of each SDK writes it: only the base URL and the key change. Each
check prints one line; a failed check prints its reason, the others still run, and
the script exits 1 if any failed. Every answer's cost is checked end to end: the
reported `usage.cost` equals `/v1/generation?id=…`'s `total_cost`, equals the tokens
times the prices `/v1/models` shows, and equals what the key was debited
(`/v1/key` before and after).

Env: SWITCHBOARD_BASE_URL (http://127.0.0.1:PORT), SWITCHBOARD_API_KEY; optional
SWITCHBOARD_CHAT_MODEL (default mock/echo, which repeats the last user message) and
SWITCHBOARD_EMBED_MODEL (default mock/embed). Arguments: run only the checks whose
names start with one of them (e.g. `chat anthropic.messages`).
Run through tests/clients/run, which builds and starts the gateway.
"""

from __future__ import annotations

import base64
import json
import math
import os
import struct
import sys
import traceback
import urllib.error
import urllib.parse
import urllib.request
from decimal import Decimal
from typing import Any, Callable

import anthropic
import openai

BASE_URL = os.environ["SWITCHBOARD_BASE_URL"].rstrip("/")
API_KEY = os.environ["SWITCHBOARD_API_KEY"]
CHAT_MODEL = os.environ.get("SWITCHBOARD_CHAT_MODEL", "mock/echo")
EMBED_MODEL = os.environ.get("SWITCHBOARD_EMBED_MODEL", "mock/embed")
MISSING_MODEL = "mock/no-such-model"
WRONG_KEY = "sk-not-a-key-of-this-gateway-0123456789"

# The Anthropic SDK appends /v1/messages itself; the OpenAI SDK wants the /v1 prefix.
claude = anthropic.Anthropic(base_url=BASE_URL, api_key=API_KEY)
oai = openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key=API_KEY)


class CheckFailed(Exception):
    """A check saw something other than what the SPEC says."""


def expect(cond: bool, why: str) -> None:
    if not cond:
        raise CheckFailed(why)


def equal(got: Any, want: Any, what: str) -> None:
    expect(got == want, f"{what}: got {got!r}, want {want!r}")


# --- the gateway's own endpoints, read without an SDK, numbers as exact decimals ---


def gateway_get(path: str, key: str | None = API_KEY) -> Any:
    req = urllib.request.Request(BASE_URL + path)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read(), parse_float=Decimal)
    except urllib.error.HTTPError as e:
        raise CheckFailed(f"GET {path}: {e.code} {e.read()[:300]!r}") from None


def usd(value: Any) -> Decimal:
    """A USD amount an SDK parsed as a float (or int), as the decimal the gateway wrote.

    `repr` of a float is the shortest text that reads back as it, so for amounts of
    up to 15 significant digits it is the text that was on the wire.
    """
    if isinstance(value, Decimal):
        return value
    expect(isinstance(value, (int, float)) and not isinstance(value, bool), f"cost {value!r} is not a number")
    return Decimal(repr(value))


def key_usage() -> Decimal:
    return Decimal(gateway_get("/v1/key")["data"]["usage"])


_prices: dict[str, tuple[Decimal, Decimal]] = {}


def prices(model: str) -> tuple[Decimal, Decimal]:
    """USD per prompt token and per completion token, as /v1/models shows them."""
    if model not in _prices:
        p = gateway_get("/v1/models/" + model, key=None)["pricing"]
        _prices[model] = (Decimal(p["prompt"]), Decimal(p["completion"]))
    return _prices[model]


class Money:
    """What one check was charged: each answer's cost checked as it comes."""

    def __init__(self) -> None:
        self.charged = Decimal(0)

    def answer(self, gen_id: Any, cost: Any, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """An answer said it cost `cost` for these tokens: the gateway agrees."""
        expect(isinstance(gen_id, str) and gen_id != "", f"the answer has no id ({gen_id!r})")
        cost = usd(cost)
        gen = gateway_get("/v1/generation?id=" + urllib.parse.quote(gen_id, safe=""))["data"]
        equal(gen["id"], gen_id, "/v1/generation id")
        equal(gen["model"], model, f"/v1/generation?id={gen_id} model")
        equal(gen["prompt_tokens"], prompt_tokens, f"/v1/generation?id={gen_id} prompt_tokens")
        equal(gen["completion_tokens"], completion_tokens, f"/v1/generation?id={gen_id} completion_tokens")
        equal(Decimal(gen["total_cost"]), cost, f"/v1/generation?id={gen_id} total_cost vs usage.cost")
        per_prompt, per_completion = prices(model)
        priced = prompt_tokens * per_prompt + completion_tokens * per_completion
        equal(cost, priced, f"usage.cost vs {prompt_tokens} prompt + {completion_tokens} completion tokens at /v1/models prices")
        expect(cost > 0, f"{gen_id} cost nothing")
        self.charged += cost


CHECKS: list[tuple[str, Callable[[Money], str]]] = []


def check(name: str) -> Callable[[Callable[[Money], str]], Callable[[Money], str]]:
    def register(f: Callable[[Money], str]) -> Callable[[Money], str]:
        CHECKS.append((name, f))
        return f

    return register


# --- openai: chat completions (served today) ---


@check("chat.completions.create")
def chat_create(money: Money) -> str:
    text = "Hello from the OpenAI SDK"
    resp = oai.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}],
    )
    equal(resp.object, "chat.completion", "object")
    equal(resp.model, CHAT_MODEL, "model")
    equal(resp.choices[0].message.role, "assistant", "role")
    equal(resp.choices[0].message.content, text, "the echo")
    equal(resp.choices[0].finish_reason, "stop", "finish_reason")
    u = resp.usage
    equal(u.total_tokens, u.prompt_tokens + u.completion_tokens, "usage.total_tokens")
    money.answer(resp.id, u.cost, CHAT_MODEL, u.prompt_tokens, u.completion_tokens)
    return f"{resp.id}: {u.prompt_tokens}+{u.completion_tokens} tokens, ${usd(u.cost)}"


@check("chat.completions.create(stream=True)")
def chat_stream(money: Money) -> str:
    text = "a streamed reply comes word by word"
    stream = oai.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": text}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, ids, finish, usage = [], set(), None, None
    for chunk in stream:
        ids.add(chunk.id)
        equal(chunk.object, "chat.completion.chunk", "chunk object")
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    equal("".join(pieces), text, "the streamed echo")
    expect(len(pieces) > 1, f"one content chunk only ({pieces!r}): not streamed")
    equal(finish, "stop", "finish_reason")
    equal(len(ids), 1, f"chunk ids {ids}")
    expect(usage is not None, "no usage chunk despite stream_options.include_usage")
    money.answer(ids.pop(), usage.cost, CHAT_MODEL, usage.prompt_tokens, usage.completion_tokens)
    return f"{len(pieces)} content chunks, ${usd(usage.cost)}"


@check("chat.completions.stream")
def chat_stream_helper(money: Money) -> str:
    text = "the SDK's stream helper accumulates this"
    with oai.chat.completions.stream(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": text}],
        stream_options={"include_usage": True},
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    equal("".join(deltas), text, "content.delta events")
    equal(final.choices[0].message.content, text, "get_final_completion() content")
    u = final.usage
    money.answer(final.id, u.cost, CHAT_MODEL, u.prompt_tokens, u.completion_tokens)
    return f"{len(deltas)} content.delta events, final {final.id}"


@check("chat.errors")
def chat_errors(money: Money) -> str:
    try:
        openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key=WRONG_KEY).chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        raise CheckFailed("a wrong key was served")
    except openai.AuthenticationError as e:
        equal(e.code, "invalid_api_key", "401 code")
        expect("unknown API key" in str(e.body), f"401 is not our message: {e.body!r}")
    try:
        oai.chat.completions.create(model=MISSING_MODEL, messages=[{"role": "user", "content": "hi"}])
        raise CheckFailed("a missing model was served")
    except openai.NotFoundError as e:
        equal(e.code, "model_not_found", "404 code")
        expect(f"no model `{MISSING_MODEL}`" in str(e.body), f"404 is not our message: {e.body!r}")
    return "AuthenticationError (invalid_api_key), NotFoundError (model_not_found)"


# --- anthropic: /v1/messages and /v1/messages/count_tokens (SPEC §7.1) ---


def check_message(msg: Any, text: str | None) -> None:
    equal(msg.type, "message", "type")
    equal(msg.role, "assistant", "role")
    equal(msg.model, CHAT_MODEL, "model")
    equal(msg.stop_reason, "end_turn", "stop_reason")
    expect(len(msg.content) >= 1 and msg.content[0].type == "text", f"content {msg.content!r}")
    if text is not None:
        equal(msg.content[0].text, text, "the echo")
    else:
        expect(msg.content[0].text != "", "empty text")


@check("anthropic.messages.create")
def messages_create(money: Money) -> str:
    text = "Hello from the Anthropic SDK"
    msg = claude.messages.create(model=CHAT_MODEL, max_tokens=64, messages=[{"role": "user", "content": text}])
    check_message(msg, text)
    u = msg.usage
    money.answer(msg.id, u.cost, CHAT_MODEL, u.input_tokens, u.output_tokens)
    return f"{msg.id}: {u.input_tokens}+{u.output_tokens} tokens, ${usd(u.cost)}"


@check("anthropic.messages.create(system)")
def messages_system(money: Money) -> str:
    text = "the system prompt counts"
    plain = claude.messages.create(model=CHAT_MODEL, max_tokens=64, messages=[{"role": "user", "content": text}])
    msg = claude.messages.create(
        model=CHAT_MODEL,
        max_tokens=64,
        system="You are a careful assistant who answers in one short sentence.",
        messages=[{"role": "user", "content": text}],
    )
    check_message(msg, text)
    expect(
        msg.usage.input_tokens > plain.usage.input_tokens,
        f"input_tokens with a system prompt {msg.usage.input_tokens} <= without {plain.usage.input_tokens}",
    )
    for m in (plain, msg):
        money.answer(m.id, m.usage.cost, CHAT_MODEL, m.usage.input_tokens, m.usage.output_tokens)
    return f"input_tokens {plain.usage.input_tokens} -> {msg.usage.input_tokens} with system"


@check("anthropic.messages.create(tool_result)")
def messages_tools(money: Money) -> str:
    # The mock never asks for a tool (it echoes), so the first half of the round trip,
    # a tool_use answer, cannot be produced here: this sends the conversation a client
    # holds after one, with the tool's result, and checks the model answers it.
    tools = [
        {
            "name": "get_weather",
            "description": "The weather in a city now.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }
    ]
    msg = claude.messages.create(
        model=CHAT_MODEL,
        max_tokens=64,
        tools=tools,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "18 C and sunny"}],
            },
        ],
    )
    check_message(msg, None)
    money.answer(msg.id, msg.usage.cost, CHAT_MODEL, msg.usage.input_tokens, msg.usage.output_tokens)
    return f"answered after tool_result: {msg.content[0].text!r}"


@check("anthropic.messages.stream")
def messages_stream(money: Money) -> str:
    text = "streamed through the Anthropic helper"
    with claude.messages.stream(model=CHAT_MODEL, max_tokens=64, messages=[{"role": "user", "content": text}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    equal("".join(pieces), text, "text_stream")
    expect(len(pieces) > 1, f"one text delta only ({pieces!r}): not streamed")
    check_message(final, text)
    # The helper's final message keeps message_delta's token counts but not our
    # `cost` (the next check reads it from the event): its tokens are priced here,
    # and the runner checks the key was debited that.
    u = final.usage
    per_prompt, per_completion = prices(CHAT_MODEL)
    cost = u.input_tokens * per_prompt + u.output_tokens * per_completion
    money.answer(final.id, cost, CHAT_MODEL, u.input_tokens, u.output_tokens)
    return f"{len(pieces)} text deltas, final {final.id}"


@check("anthropic.messages.stream(events)")
def messages_stream_events(money: Money) -> str:
    text = "every event in its order"
    with claude.messages.stream(model=CHAT_MODEL, max_tokens=64, messages=[{"role": "user", "content": text}]) as stream:
        events = list(stream)
    raw = [e.type for e in events if e.type != "ping"]
    equal(raw[0], "message_start", "first event")
    equal(raw[-1], "message_stop", "last event")
    for kind in ("content_block_start", "content_block_delta", "content_block_stop", "message_delta"):
        expect(kind in raw, f"no {kind} event in {raw}")
    expect(raw.index("content_block_stop") < raw.index("message_delta"), f"events out of order: {raw}")
    start = next(e for e in events if e.type == "message_start").message
    delta = next(e for e in events if e.type == "message_delta")
    equal(delta.delta.stop_reason, "end_turn", "message_delta stop_reason")
    streamed = "".join(e.text for e in events if e.type == "text")
    equal(streamed, text, "text events")
    u = delta.usage
    input_tokens = u.input_tokens if u.input_tokens is not None else start.usage.input_tokens
    money.answer(start.id, u.cost, CHAT_MODEL, input_tokens, u.output_tokens)
    return f"{len(events)} events, message_delta usage.cost ${usd(u.cost)}"


@check("anthropic.messages.count_tokens")
def count_tokens(money: Money) -> str:
    before = key_usage()
    short = claude.messages.count_tokens(model=CHAT_MODEL, messages=[{"role": "user", "content": "count me"}])
    again = claude.messages.count_tokens(model=CHAT_MODEL, messages=[{"role": "user", "content": "count me"}])
    longer = claude.messages.count_tokens(
        model=CHAT_MODEL,
        system="A system prompt adds tokens too.",
        messages=[{"role": "user", "content": "count me, and these few words as well"}],
    )
    expect(isinstance(short.input_tokens, int) and short.input_tokens > 0, f"input_tokens {short.input_tokens!r}")
    equal(again.input_tokens, short.input_tokens, "the same request counted twice")
    expect(longer.input_tokens > short.input_tokens, f"more text, {longer.input_tokens} <= {short.input_tokens} tokens")
    equal(key_usage(), before, "key usage after count_tokens (free of charge)")
    return f"{short.input_tokens} and {longer.input_tokens} input tokens, free"


@check("anthropic.errors")
def anthropic_errors(money: Money) -> str:
    def anthropic_shape(e: anthropic.APIStatusError, kind: str) -> str:
        """The body is `{"type":"error","error":{"type","message"}}`: the message."""
        body = e.body if isinstance(e.body, dict) else {}
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        expect(body.get("type") == "error" and error.get("type") == kind, f"not an Anthropic {kind} body: {e.body!r}")
        return str(error.get("message", ""))

    try:
        anthropic.Anthropic(base_url=BASE_URL, api_key=WRONG_KEY).messages.create(
            model=CHAT_MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
        raise CheckFailed("a wrong key was served")
    except anthropic.AuthenticationError as e:
        message = anthropic_shape(e, "authentication_error")
        expect("unknown API key" in message, f"401 is not our message: {message!r}")
    try:
        claude.messages.create(model=MISSING_MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}])
        raise CheckFailed("a missing model was served")
    except anthropic.NotFoundError as e:
        message = anthropic_shape(e, "not_found_error")
        expect(f"no model `{MISSING_MODEL}`" in message, f"404 is not our message: {message!r}")
    return "AuthenticationError (authentication_error), NotFoundError (not_found_error), our messages"


# --- openai: /v1/responses (SPEC §7.2) ---


def check_response(resp: Any, text: str) -> None:
    equal(resp.object, "response", "object")
    equal(resp.status, "completed", "status")
    equal(resp.model, CHAT_MODEL, "model")
    equal(resp.output_text, text, "output_text (the echo)")
    messages = [item for item in resp.output if item.type == "message"]
    equal(len(messages), 1, "message items")
    equal(messages[0].content[0].type, "output_text", "content part type")
    u = resp.usage
    equal(u.total_tokens, u.input_tokens + u.output_tokens, "usage.total_tokens")


@check("openai.responses.create")
def responses_create(money: Money) -> str:
    text = "Hello from the Responses API"
    resp = oai.responses.create(model=CHAT_MODEL, input=text, instructions="Answer in one sentence.")
    check_response(resp, text)
    u = resp.usage
    money.answer(resp.id, u.cost, CHAT_MODEL, u.input_tokens, u.output_tokens)
    return f"{resp.id}: {u.input_tokens}+{u.output_tokens} tokens, ${usd(u.cost)}"


RESPONSE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def check_event_order(kinds: list[str], seqs: list[int]) -> None:
    equal(kinds[0], "response.created", "first event")
    equal(kinds[-1], "response.completed", "last event")
    expect(seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"sequence_number not increasing: {seqs}")
    at = [kinds.index(k) if k in kinds else -1 for k in RESPONSE_EVENTS]
    missing = [k for k, i in zip(RESPONSE_EVENTS, at) if i < 0]
    expect(not missing, f"no {missing} events in {kinds}")
    expect(at == sorted(at), f"events out of order: {kinds}")


@check("openai.responses.stream")
def responses_stream(money: Money) -> str:
    text = "streamed through the Responses helper"
    with oai.responses.stream(model=CHAT_MODEL, input=text, instructions="Be brief.") as stream:
        events = list(stream)
        final = stream.get_final_response()
    check_event_order([e.type for e in events], [e.sequence_number for e in events])
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    equal("".join(deltas), text, "output_text.delta events")
    done = next(e for e in events if e.type == "response.output_text.done")
    equal(done.text, text, "output_text.done text")
    check_response(final, text)
    u = final.usage
    money.answer(final.id, u.cost, CHAT_MODEL, u.input_tokens, u.output_tokens)
    return f"{len(events)} events ({len(deltas)} deltas), final {final.id}, ${usd(u.cost)}"


@check("openai.responses.create(stream=True)")
def responses_create_stream(money: Money) -> str:
    text = "raw events of the Responses API"
    events = list(oai.responses.create(model=CHAT_MODEL, input=text, stream=True))
    check_event_order([e.type for e in events], [e.sequence_number for e in events])
    equal("".join(e.delta for e in events if e.type == "response.output_text.delta"), text, "deltas")
    created, completed = events[0].response, events[-1].response
    equal(completed.id, created.id, "response id across events")
    check_response(completed, text)
    u = completed.usage
    money.answer(completed.id, u.cost, CHAT_MODEL, u.input_tokens, u.output_tokens)
    return f"{len(events)} events, response.completed usage.cost ${usd(u.cost)}"


@check("openai.responses.previous_response_id")
def responses_previous(money: Money) -> str:
    try:
        oai.responses.create(model=CHAT_MODEL, input="and then?", previous_response_id="resp_123")
        raise CheckFailed("previous_response_id was accepted")
    except openai.BadRequestError as e:
        equal(e.code, "invalid_request", "400 code")
        message = e.body.get("message", "") if isinstance(e.body, dict) else ""
        expect(message.startswith("previous_response_id is not supported"), f"400 is not our message: {e.body!r}")
    return "BadRequestError: " + message


# --- openai: /v1/embeddings (SPEC §7.3) ---


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def check_vector(v: Any, dims: int, what: str) -> None:
    expect(isinstance(v, list) and all(isinstance(x, float) for x in v), f"{what}: not a list of floats: {v!r}")
    equal(len(v), dims, f"{what}: dimensions")
    norm = math.sqrt(sum(x * x for x in v))
    expect(abs(norm - 1) < 1e-5, f"{what}: norm {norm}, want 1")


def embeddings_money(money: Money, resp: Any) -> None:
    u = resp.usage
    equal(u.total_tokens, u.prompt_tokens, "embeddings usage.total_tokens")
    money.answer(getattr(resp, "id", None), u.cost, EMBED_MODEL, u.prompt_tokens, 0)


@check("completions.create")
def completions_create(money: Money) -> str:
    text = "Hello from the legacy completions API"
    resp = oai.completions.create(model=CHAT_MODEL, prompt=text, max_tokens=20, n=2)
    equal(resp.object, "text_completion", "object")
    equal(resp.model, CHAT_MODEL, "model")
    equal(len(resp.choices), 2, "choices with n=2")
    for i, choice in enumerate(resp.choices):
        equal(choice.index, i, "choice index")
        equal(choice.text, text, "the echo")
        equal(choice.finish_reason, "stop", "finish_reason")
    u = resp.usage
    equal(u.total_tokens, u.prompt_tokens + u.completion_tokens, "usage.total_tokens")
    money.answer(resp.id, u.cost, CHAT_MODEL, u.prompt_tokens, u.completion_tokens)
    return f"{resp.id}: {u.prompt_tokens}+{u.completion_tokens} tokens, ${usd(u.cost)}"


@check("completions.create(stream=True)")
def completions_stream(money: Money) -> str:
    text = "legacy text arrives word by word"
    stream = oai.completions.create(
        model=CHAT_MODEL, prompt=text, stream=True, stream_options={"include_usage": True}
    )
    pieces, ids, finish, usage = [], set(), None, None
    for chunk in stream:
        ids.add(chunk.id)
        equal(chunk.object, "text_completion", "chunk object")
        for choice in chunk.choices:
            if choice.text:
                pieces.append(choice.text)
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    equal("".join(pieces), text, "the streamed echo")
    expect(len(pieces) > 1, f"one text chunk only ({pieces!r}): not streamed")
    equal(finish, "stop", "finish_reason")
    equal(len(ids), 1, f"chunk ids {ids}")
    expect(usage is not None, "no usage chunk despite stream_options.include_usage")
    money.answer(ids.pop(), usage.cost, CHAT_MODEL, usage.prompt_tokens, usage.completion_tokens)
    return f"{len(pieces)} text chunks, ${usd(usage.cost)}"


@check("openai.embeddings.create")
def embeddings_default(money: Money) -> str:
    # No encoding_format: the SDK asks for base64 and decodes it into floats.
    raw = oai.embeddings.with_raw_response.create(model=EMBED_MODEL, input=["first input", "second input"])
    wire = json.loads(raw.text)
    expect(all(isinstance(d["embedding"], str) for d in wire["data"]), "the SDK asked for base64 and got floats")
    resp = raw.parse()
    equal(resp.object, "list", "object")
    equal(resp.model, EMBED_MODEL, "model")
    equal([d.index for d in resp.data], [0, 1], "indices")
    for d, w in zip(resp.data, wire["data"]):
        check_vector(d.embedding, 8, f"data[{d.index}]")
        equal(d.embedding, list(struct.unpack("<8f", base64.b64decode(w["embedding"]))), "decoded vector")
    expect(resp.data[0].embedding != resp.data[1].embedding, "two inputs, one vector")
    again = oai.embeddings.create(model=EMBED_MODEL, input="first input")
    equal(again.data[0].embedding, resp.data[0].embedding, "the same input embedded again (deterministic)")
    embeddings_money(money, resp)
    embeddings_money(money, again)
    return f"2 vectors of 8 (base64, decoded), unit norm, {resp.usage.prompt_tokens} tokens, ${usd(resp.usage.cost)}"


@check("openai.embeddings.create(float)")
def embeddings_float(money: Money) -> str:
    b64 = oai.embeddings.create(model=EMBED_MODEL, input="as floats, please")
    resp = oai.embeddings.create(model=EMBED_MODEL, input="as floats, please", encoding_format="float")
    check_vector(resp.data[0].embedding, 8, "float vector")
    equal([f32(x) for x in resp.data[0].embedding], b64.data[0].embedding, "float vs base64 of the same input")
    embeddings_money(money, b64)
    embeddings_money(money, resp)
    return "8 floats, the base64 vector's values"


@check("openai.embeddings.create(dimensions)")
def embeddings_dimensions(money: Money) -> str:
    resp = oai.embeddings.create(model=EMBED_MODEL, input="sixteen of them", dimensions=16)
    check_vector(resp.data[0].embedding, 16, "dimensions=16")
    embeddings_money(money, resp)
    return "16 dimensions, unit norm"


def main(argv: list[str]) -> int:
    selected = [(n, f) for n, f in CHECKS if not argv or any(n.startswith(p) for p in argv)]
    if not selected:
        print(f"no check starts with {argv}; checks: {[n for n, _ in CHECKS]}")
        return 1
    failed = []
    for name, f in selected:
        money = Money()
        try:
            before = key_usage()
            detail = f(money)
            equal(key_usage() - before, money.charged, "the key's debit vs the costs reported")
            print(f"ok    {name}: {detail}")
        except (CheckFailed, openai.APIError, anthropic.APIError) as e:
            failed.append(name)
            print(f"FAIL  {name}: {type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - an SDK or a model that chokes on an answer
            failed.append(name)
            where = traceback.extract_tb(e.__traceback__)[-1]
            print(f"FAIL  {name}: {type(e).__name__}: {e} (at {os.path.basename(where.filename)}:{where.lineno})")
    print(f"{len(selected) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
