#!/usr/bin/env python3
"""Drive a running semantic server with the official OpenAI and Anthropic Python SDKs.

Usage: sdk_check.py BASE_URL [--api-key KEY] [--model NAME]

BASE_URL is the server root, e.g. http://127.0.0.1:8099 (the OpenAI client gets BASE_URL/v1,
the Anthropic client BASE_URL). Checks, with both SDKs: non-streaming and streaming chat, a
tool-call round trip (streaming and not), token counting, model listing, error parsing, and
that an agent's second turn reports a cache read in the usage fields. Exits 1 on any failure.

Works against any model: tool-call checks accept a plain-text answer from a model that does
not call the tool unless --expect-tool-calls is given (the fake server always calls it).
"""

import argparse
import json
import sys
import traceback
import uuid

import anthropic
import openai

SYSTEM = (
    "You are a careful coding agent working in a large Rust repository. Follow the style "
    "guide, write tests for every change, explain each change briefly, keep functions small, "
    "and never invent APIs that do not exist. Prefer clear names over comments. Answer briefly. "
    # Long enough (over 256 tokens) that an agent's second turn can reuse a whole cache block.
    + " ".join(
        f"Rule {i}: read the surrounding code, keep public interfaces stable, and document "
        "every public item in one or two sentences."
        for i in range(1, 13)
    )
)

WEATHER_OA = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
        },
    },
}
WEATHER_AN = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}

FAILURES = []


def check(name, fn):
    try:
        fn()
        print(f"ok    {name}")
    except Exception as e:  # noqa: BLE001 - report every failure and go on
        FAILURES.append(name)
        print(f"FAIL  {name}: {type(e).__name__}: {e}")
        traceback.print_exc(limit=3)


def expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base_url")
    ap.add_argument("--api-key", default="sk-local")
    ap.add_argument("--model", default="local")
    ap.add_argument("--expect-tool-calls", action="store_true")
    args = ap.parse_args()
    base = args.base_url.rstrip("/")
    oa = openai.OpenAI(base_url=base + "/v1", api_key=args.api_key, max_retries=0, timeout=120)
    an = anthropic.Anthropic(base_url=base, api_key=args.api_key, max_retries=0, timeout=120)
    model = args.model
    run = uuid.uuid4().hex[:8]
    print(f"openai {openai.__version__}, anthropic {anthropic.__version__}, server {base}")

    def oa_messages(q):
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]

    # ---------------- OpenAI ----------------
    def openai_chat():
        r = oa.chat.completions.create(model=model, messages=oa_messages("Say hello."), max_tokens=24)
        expect(r.object == "chat.completion", r.object)
        c = r.choices[0]
        expect(c.message.role == "assistant", c.message.role)
        expect(isinstance(c.message.content, str), c.message.content)
        expect(c.finish_reason in ("stop", "length"), c.finish_reason)
        u = r.usage
        expect(u.total_tokens == u.prompt_tokens + u.completion_tokens, u)
        expect(u.prompt_tokens_details.cached_tokens <= u.prompt_tokens, u)

    def openai_cache_read():
        agent = f"sdk-oa-{run}"
        msgs = oa_messages("Name one prime number.")
        first = oa.chat.completions.with_raw_response.create(
            model=model, messages=msgs, max_tokens=16, extra_headers={"X-Agent-Id": agent}
        )
        expect(first.headers.get("x-semantic-cache", "").startswith("tier="), first.headers)
        r1 = first.parse()
        r2 = oa.chat.completions.create(
            model=model, messages=msgs, max_tokens=16, extra_headers={"X-Agent-Id": agent}
        )
        cached = r2.usage.prompt_tokens_details.cached_tokens
        expect(cached > 0, f"second turn cached_tokens = {cached}")
        expect(cached <= r2.usage.prompt_tokens, r2.usage)
        expect(r1.usage.prompt_tokens == r2.usage.prompt_tokens, (r1.usage, r2.usage))
        # prompt_cache_key names the agent too.
        r3 = oa.chat.completions.create(
            model=model, messages=msgs, max_tokens=16, prompt_cache_key=agent
        )
        expect(r3.usage.prompt_tokens_details.cached_tokens > 0, r3.usage)

    def openai_stream():
        stream = oa.chat.completions.create(
            model=model,
            messages=oa_messages("Count to three."),
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, usage, roles = "", None, None, 0
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for ch in chunk.choices:
                if ch.delta.role:
                    roles += 1
                if ch.delta.content:
                    text += ch.delta.content
                if ch.finish_reason:
                    finish = ch.finish_reason
        expect(roles == 1, f"role chunks: {roles}")
        expect(finish in ("stop", "length"), finish)
        expect(usage is not None and usage.completion_tokens >= 0, usage)

    def openai_tools():
        msgs = oa_messages("What is the weather in Paris? Use the tool.")
        r = oa.chat.completions.create(model=model, messages=msgs, tools=[WEATHER_OA], max_tokens=64)
        c = r.choices[0]
        if not c.message.tool_calls:
            expect(not args.expect_tool_calls, f"no tool call: {c.message.content!r}")
            return
        expect(c.finish_reason == "tool_calls", c.finish_reason)
        call = c.message.tool_calls[0]
        expect(call.type == "function" and call.function.name == "get_weather", call)
        expect(isinstance(json.loads(call.function.arguments), dict), call.function.arguments)
        msgs.append(c.message.model_dump(exclude_none=True))
        msgs.append({"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'})
        r2 = oa.chat.completions.create(model=model, messages=msgs, tools=[WEATHER_OA], max_tokens=64)
        expect(isinstance(r2.choices[0].message.content, str), r2.choices[0].message)
        if args.expect_tool_calls:
            expect(r2.choices[0].finish_reason == "stop", r2.choices[0].finish_reason)
            expect("21" in r2.choices[0].message.content, r2.choices[0].message.content)

    def openai_tools_stream():
        stream = oa.chat.completions.create(
            model=model,
            messages=oa_messages("Weather in Oslo? Use the tool."),
            tools=[WEATHER_OA],
            max_tokens=64,
            stream=True,
        )
        calls, finish = {}, None
        for chunk in stream:
            for ch in chunk.choices:
                for tc in ch.delta.tool_calls or []:
                    entry = calls.setdefault(tc.index, {"name": "", "args": "", "id": None})
                    if tc.id:
                        entry["id"] = tc.id
                    if tc.function and tc.function.name:
                        entry["name"] += tc.function.name
                    if tc.function and tc.function.arguments:
                        entry["args"] += tc.function.arguments
                if ch.finish_reason:
                    finish = ch.finish_reason
        if not calls:
            expect(not args.expect_tool_calls, "no streamed tool call")
            return
        expect(finish == "tool_calls", finish)
        expect(calls[0]["name"] == "get_weather" and calls[0]["id"], calls)
        expect(isinstance(json.loads(calls[0]["args"]), dict), calls)

    def openai_models_and_errors():
        models = oa.models.list()
        expect(len(models.data) == 1 and models.data[0].id, models)
        try:
            oa.chat.completions.create(model=model, messages=oa_messages("x"), n=2)
            raise AssertionError("n=2 was accepted")
        except openai.BadRequestError as e:
            expect(e.status_code == 400 and "n" in str(e), e)

    # ---------------- Anthropic ----------------
    def an_sum(u):
        return u.input_tokens + (u.cache_creation_input_tokens or 0) + (u.cache_read_input_tokens or 0)

    def anthropic_messages():
        params = dict(
            model=model,
            max_tokens=24,
            system=[{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
            messages=[{"role": "user", "content": "Say hello."}],
        )
        m = an.messages.create(**params)
        expect(m.type == "message" and m.role == "assistant", m)
        expect(m.content and m.content[0].type == "text", m.content)
        expect(m.stop_reason in ("end_turn", "max_tokens"), m.stop_reason)
        counted = an.messages.count_tokens(
            model=model, system=params["system"], messages=params["messages"]
        )
        expect(an_sum(m.usage) == counted.input_tokens, (m.usage, counted))

    def anthropic_cache_read():
        user = f"sdk-an-{run}"
        params = dict(
            model=model,
            max_tokens=16,
            system=SYSTEM,
            messages=[{"role": "user", "content": "Name one prime number."}],
            metadata={"user_id": user},
        )
        m1 = an.messages.create(**params)
        m2 = an.messages.create(**params)
        expect(m2.usage.cache_read_input_tokens > 0, m2.usage)
        expect(an_sum(m1.usage) == an_sum(m2.usage), (m1.usage, m2.usage))

    def anthropic_stream():
        with an.messages.stream(
            model=model,
            max_tokens=24,
            system=SYSTEM,
            messages=[{"role": "user", "content": "Count to three."}],
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        expect(final.content[0].type == "text" and final.content[0].text == text, (final, text))
        expect(final.stop_reason in ("end_turn", "max_tokens"), final.stop_reason)
        expect(final.usage.output_tokens >= 0 and an_sum(final.usage) > 0, final.usage)
        # Raw events, as a plain iterator.
        events = [e.type for e in an.messages.create(
            model=model, max_tokens=8, stream=True,
            messages=[{"role": "user", "content": "hi"}],
        )]
        expect(events[0] == "message_start" and events[-1] == "message_stop", events)
        expect("message_delta" in events, events)

    def anthropic_tools():
        msgs = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
        m = an.messages.create(model=model, max_tokens=64, system=SYSTEM, tools=[WEATHER_AN], messages=msgs)
        uses = [b for b in m.content if b.type == "tool_use"]
        if not uses:
            expect(not args.expect_tool_calls, f"no tool_use: {m.content}")
            return
        expect(m.stop_reason == "tool_use", m.stop_reason)
        expect(uses[0].name == "get_weather" and isinstance(uses[0].input, dict), uses[0])
        msgs.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]})
        msgs.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": uses[0].id, "content": "21 degrees"}
        ]})
        m2 = an.messages.create(model=model, max_tokens=64, system=SYSTEM, tools=[WEATHER_AN], messages=msgs)
        expect(m2.content and m2.content[0].type == "text", m2.content)
        if args.expect_tool_calls:
            expect("21" in m2.content[0].text and m2.stop_reason == "end_turn", m2)

    def anthropic_tools_stream():
        with an.messages.stream(
            model=model,
            max_tokens=64,
            system=SYSTEM,
            tools=[WEATHER_AN],
            messages=[{"role": "user", "content": "Weather in Oslo? Use the tool."}],
        ) as stream:
            for _ in stream:
                pass
            final = stream.get_final_message()
        uses = [b for b in final.content if b.type == "tool_use"]
        if not uses:
            expect(not args.expect_tool_calls, f"no streamed tool_use: {final.content}")
            return
        expect(final.stop_reason == "tool_use", final.stop_reason)
        expect(uses[0].name == "get_weather" and isinstance(uses[0].input, dict), uses[0])

    def anthropic_models_and_errors():
        page = an.models.list()
        expect(len(page.data) == 1 and page.data[0].id, page)
        try:
            an.messages.create(
                model=model,
                max_tokens=8,
                messages=[{"role": "user", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
                ]}],
            )
            raise AssertionError("an image was accepted")
        except anthropic.BadRequestError as e:
            expect(e.status_code == 400 and "image" in str(e), e)

    for name, fn in [
        ("openai: chat", openai_chat),
        ("openai: cache read on the second turn", openai_cache_read),
        ("openai: streaming with usage", openai_stream),
        ("openai: tool call round trip", openai_tools),
        ("openai: streamed tool call", openai_tools_stream),
        ("openai: models and errors", openai_models_and_errors),
        ("anthropic: messages and count_tokens", anthropic_messages),
        ("anthropic: cache read on the second turn", anthropic_cache_read),
        ("anthropic: streaming", anthropic_stream),
        ("anthropic: tool use round trip", anthropic_tools),
        ("anthropic: streamed tool use", anthropic_tools_stream),
        ("anthropic: models and errors", anthropic_models_and_errors),
    ]:
        check(name, fn)

    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed: {', '.join(FAILURES)}")
        return 1
    print("all SDK checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
