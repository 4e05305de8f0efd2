// Drive a running semantic server with the official Node SDKs (`openai`, `@anthropic-ai/sdk`).
//
// Usage: node node_check.mjs BASE_URL [--expect-tool-calls]
//
// BASE_URL is the server root (the OpenAI client gets BASE_URL/v1). Checks, with both SDKs:
// a plain answer, a streamed one (the SDKs' stream helpers and their final message), and a
// tool round trip (the call the model made, or a scripted one when the model answered in
// text; with --expect-tool-calls the model must call the tool). Prints `ok NAME` per check
// and exits 1 on any failure.
import OpenAI from "openai";
import Anthropic from "@anthropic-ai/sdk";

const base = process.argv[2].replace(/\/$/, "");
const expectToolCalls = process.argv.includes("--expect-tool-calls");
const oa = new OpenAI({ baseURL: `${base}/v1`, apiKey: "sk-local", maxRetries: 0, timeout: 300_000 });
const an = new Anthropic({ baseURL: base, apiKey: "sk-local", maxRetries: 0, timeout: 300_000 });
const model = "local";
const failures = [];

function expect(cond, msg) {
  if (!cond) throw new Error(typeof msg === "string" ? msg : JSON.stringify(msg));
}

async function check(name, fn) {
  try {
    await fn();
    console.log(`ok    ${name}`);
  } catch (e) {
    failures.push(name);
    console.log(`FAIL  ${name}: ${e && e.stack ? e.stack : e}`);
  }
}

const SYSTEM = "You are a careful coding agent. Answer briefly.";
const weatherOa = {
  type: "function",
  function: {
    name: "get_weather",
    description: "Current weather for a city",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
};
const weatherAn = {
  name: "get_weather",
  description: "Current weather for a city",
  input_schema: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
};

// ---------------- OpenAI ----------------
await check("openai plain", async () => {
  const r = await oa.chat.completions.create({
    model,
    messages: [{ role: "system", content: SYSTEM }, { role: "user", content: "Say hello." }],
    max_tokens: 16,
    temperature: 0,
  });
  expect(r.object === "chat.completion", r);
  expect(typeof r.choices[0].message.content === "string", r.choices[0].message);
  expect(["stop", "length"].includes(r.choices[0].finish_reason), r.choices[0]);
  expect(r.usage.total_tokens === r.usage.prompt_tokens + r.usage.completion_tokens, r.usage);
});

await check("openai streaming (stream helper, final message, usage)", async () => {
  const messages = [{ role: "system", content: SYSTEM }, { role: "user", content: "Count to three." }];
  const plain = await oa.chat.completions.create({ model, messages, max_tokens: 16, temperature: 0 });
  const runner = oa.chat.completions.stream({
    model, messages, max_tokens: 16, temperature: 0, stream_options: { include_usage: true },
  });
  let text = "";
  runner.on("content", (delta) => { text += delta; });
  const final = await runner.finalChatCompletion();
  expect(final.choices[0].message.content === plain.choices[0].message.content,
    { streamed: final.choices[0].message.content, plain: plain.choices[0].message.content });
  expect(text === plain.choices[0].message.content, { text });
  expect(final.usage && final.usage.prompt_tokens === plain.usage.prompt_tokens, final.usage);
});

await check("openai tool round trip (plain and streamed)", async () => {
  const messages = [
    { role: "system", content: SYSTEM },
    { role: "user", content: "What is the weather in Paris? Use the get_weather tool." },
  ];
  const r = await oa.chat.completions.create({ model, messages, tools: [weatherOa], max_tokens: 48, temperature: 0 });
  const msg = r.choices[0].message;
  const called = (msg.tool_calls || []).length > 0;
  expect(called || !expectToolCalls, { expected: "a tool call", got: msg });
  // Streamed, the SDK's final message has the non-streamed content (null with only calls).
  const final = await oa.chat.completions
    .stream({ model, messages, tools: [weatherOa], max_tokens: 48, temperature: 0 })
    .finalChatCompletion();
  const fm = final.choices[0].message;
  expect(fm.content === msg.content, { streamed: fm.content, plain: msg.content });
  expect((fm.tool_calls || []).length === (msg.tool_calls || []).length, { fm, msg });
  if (called) {
    expect(r.choices[0].finish_reason === "tool_calls", r.choices[0]);
    expect(final.choices[0].finish_reason === "tool_calls", final.choices[0]);
  }
  const call = called
    ? msg.tool_calls[0]
    : { id: "call_scripted", type: "function", function: { name: "get_weather", arguments: '{"city":"Paris"}' } };
  const back = await oa.chat.completions.create({
    model,
    tools: [weatherOa],
    max_tokens: 24,
    temperature: 0,
    messages: [
      ...messages,
      { role: "assistant", content: called ? msg.content : null, tool_calls: [call] },
      { role: "tool", tool_call_id: call.id, content: '{"temp_c": 21}' },
    ],
  });
  expect(back.choices[0].message.role === "assistant", back.choices[0]);
});

// ---------------- Anthropic ----------------
await check("anthropic plain", async () => {
  const r = await an.messages.create({
    model, max_tokens: 16, temperature: 0, system: SYSTEM,
    messages: [{ role: "user", content: "Say hello." }],
  });
  expect(r.type === "message" && r.content.length >= 1, r);
  expect(["end_turn", "max_tokens"].includes(r.stop_reason), r.stop_reason);
});

await check("anthropic streaming (final message, usage)", async () => {
  const params = {
    model, max_tokens: 16, temperature: 0, system: SYSTEM,
    messages: [{ role: "user", content: "Count to three." }],
  };
  const plain = await an.messages.create(params);
  const stream = an.messages.stream(params);
  let text = "";
  stream.on("text", (t) => { text += t; });
  const final = await stream.finalMessage();
  const plainText = plain.content.filter((b) => b.type === "text").map((b) => b.text).join("");
  expect(text === plainText, { text, plainText });
  const sum = (u) => u.input_tokens + (u.cache_read_input_tokens || 0) + (u.cache_creation_input_tokens || 0);
  expect(sum(final.usage) === sum(plain.usage), { streamed: final.usage, plain: plain.usage });
  const counted = await an.messages.countTokens({ model, system: SYSTEM, messages: params.messages });
  expect(counted.input_tokens === sum(plain.usage), { counted, usage: plain.usage });
});

await check("anthropic tool round trip (plain and streamed)", async () => {
  const messages = [{ role: "user", content: "What is the weather in Paris? Use the get_weather tool." }];
  const r = await an.messages.create({ model, max_tokens: 48, temperature: 0, system: SYSTEM, tools: [weatherAn], messages });
  const uses = r.content.filter((b) => b.type === "tool_use");
  expect(uses.length > 0 || !expectToolCalls, { expected: "a tool_use block", got: r.content });
  const final = await an.messages
    .stream({ model, max_tokens: 48, temperature: 0, system: SYSTEM, tools: [weatherAn], messages })
    .finalMessage();
  expect(final.content.filter((b) => b.type === "tool_use").length === uses.length, { final: final.content, plain: r.content });
  if (uses.length > 0) {
    expect(r.stop_reason === "tool_use" && final.stop_reason === "tool_use", [r.stop_reason, final.stop_reason]);
  }
  const use = uses[0] || { type: "tool_use", id: "toolu_scripted", name: "get_weather", input: { city: "Paris" } };
  const back = await an.messages.create({
    model, max_tokens: 24, temperature: 0, system: SYSTEM, tools: [weatherAn],
    messages: [
      ...messages,
      { role: "assistant", content: uses.length > 0 ? r.content : [use] },
      { role: "user", content: [{ type: "tool_result", tool_use_id: use.id, content: "21 degrees, sunny" }] },
    ],
  });
  expect(back.type === "message" && back.role === "assistant", back);
});

await check("anthropic system message inside messages (Claude Code's shape)", async () => {
  const r = await an.messages.create({
    model, max_tokens: 8, temperature: 0, system: SYSTEM,
    thinking: { type: "adaptive" },
    messages: [
      { role: "user", content: "Hello" },
      { role: "system", content: [{ type: "text", text: "Environment: linux", cache_control: { type: "ephemeral" } }] },
      { role: "user", content: "Say hi." },
    ],
  }, { headers: { "anthropic-beta": "claude-code-20250219,context-management-2025-06-27" } });
  expect(r.type === "message", r);
});

if (failures.length) {
  console.log(`${failures.length} failed: ${failures.join(", ")}`);
  process.exit(1);
}
console.log("all Node SDK checks passed");
