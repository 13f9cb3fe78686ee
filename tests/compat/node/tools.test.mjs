// The official Node SDK's tools and structured output against ARK, as its README and helpers write them:
// tools (auto, named, the tool-result round trip, streamed), parse() with zod, strict zodFunction tools.
// Run by tests/compat/test_node_sdk_tools.py.
import assert from "node:assert/strict";
import { test } from "node:test";

import { zodFunction, zodResponseFormat } from "openai/helpers/zod";
import { z } from "zod";

import { CHAT_MODEL, client } from "./support.mjs";

const WEATHER_TOOL = {
  type: "function",
  function: {
    name: "get_weather",
    description: "Get the current weather for a city",
    parameters: {
      type: "object",
      properties: {
        city: { type: "string", description: "The city, e.g. Paris" },
        unit: { type: "string", enum: ["celsius", "fahrenheit"] },
      },
      required: ["city"],
    },
  },
};
const WEATHER_QUESTION = [
  { role: "system", content: "You are a helpful assistant. Use the tools you are given." },
  { role: "user", content: "What is the weather in Paris?" },
];

function assertWeatherCall(call) {
  assert.equal(call.type, "function");
  assert.ok(call.id);
  assert.equal(call.function.name, "get_weather");
  const args = JSON.parse(call.function.arguments);
  assert.equal(typeof args.city, "string");
  assert.ok(args.city.length > 0);
  for (const key of Object.keys(args)) assert.ok(["city", "unit"].includes(key), `unexpected argument ${key}`);
  return args;
}

test("tools with tool_choice auto: an answer or a well-formed call", async () => {
  const reply = await client().chat.completions.create({
    model: CHAT_MODEL,
    messages: WEATHER_QUESTION,
    tools: [WEATHER_TOOL],
    tool_choice: "auto",
    temperature: 0,
    max_tokens: 120,
  });
  const choice = reply.choices[0];
  if (choice.message.tool_calls?.length) {
    assert.equal(choice.finish_reason, "tool_calls");
    choice.message.tool_calls.forEach(assertWeatherCall);
  } else {
    assert.equal(choice.finish_reason, "stop");
    assert.ok(choice.message.content);
  }
});

test("tools with a named tool_choice call that tool", async () => {
  const reply = await client().chat.completions.create({
    model: CHAT_MODEL,
    messages: WEATHER_QUESTION,
    tools: [WEATHER_TOOL],
    tool_choice: { type: "function", function: { name: "get_weather" } },
    temperature: 0,
    max_tokens: 120,
  });
  assert.equal(reply.choices[0].finish_reason, "tool_calls");
  assertWeatherCall(reply.choices[0].message.tool_calls[0]);
});

test("the tool-result round trip", async () => {
  const messages = [...WEATHER_QUESTION];
  const first = await client().chat.completions.create({
    model: CHAT_MODEL,
    messages,
    tools: [WEATHER_TOOL],
    tool_choice: "required",
    temperature: 0,
    max_tokens: 120,
  });
  const message = first.choices[0].message;
  assert.ok(message.tool_calls.length > 0);
  messages.push(message);
  for (const call of message.tool_calls) {
    const args = assertWeatherCall(call);
    messages.push({
      role: "tool",
      tool_call_id: call.id,
      content: JSON.stringify({ city: args.city, temperature: 21, sky: "sunny" }),
    });
  }
  const final = await client().chat.completions.create({
    model: CHAT_MODEL,
    messages,
    tools: [WEATHER_TOOL],
    temperature: 0,
    max_tokens: 120,
  });
  const choice = final.choices[0];
  assert.ok(["stop", "tool_calls"].includes(choice.finish_reason));
  assert.ok(choice.message.content || choice.message.tool_calls?.length);
});

test("a streamed tool call assembles through the SDK's stream helper", async () => {
  const runner = client().chat.completions.stream({
    model: CHAT_MODEL,
    messages: WEATHER_QUESTION,
    tools: [WEATHER_TOOL],
    tool_choice: { type: "function", function: { name: "get_weather" } },
    temperature: 0,
    max_tokens: 120,
  });
  const final = await runner.finalChatCompletion();
  assert.equal(final.choices[0].finish_reason, "tool_calls");
  assert.equal(final.choices[0].message.tool_calls.length, 1);
  assertWeatherCall(final.choices[0].message.tool_calls[0]);
});

const Person = z.object({
  name: z.string().describe("The person's name"),
  age: z.number().int().describe("The person's age in years"),
  hobbies: z.array(z.string()),
});

test("parse() with a zod response format", async () => {
  const completion = await client().chat.completions.parse({
    model: CHAT_MODEL,
    messages: [{ role: "user", content: "Alice is a 30 year old engineer who likes chess. Describe her." }],
    response_format: zodResponseFormat(Person, "person"),
    temperature: 0,
    max_tokens: 200,
  });
  const message = completion.choices[0].message;
  assert.equal(completion.choices[0].finish_reason, "stop");
  const person = message.parsed;
  assert.ok(person, `not parsed: ${message.content}`);
  assert.equal(typeof person.name, "string");
  assert.ok(Number.isInteger(person.age));
  assert.ok(Array.isArray(person.hobbies));
});

test("parse() with a strict zodFunction tool gives parsed arguments", async () => {
  const completion = await client().chat.completions.parse({
    model: CHAT_MODEL,
    messages: WEATHER_QUESTION,
    tools: [
      zodFunction({
        name: "get_weather",
        description: "Get the current weather for a city",
        parameters: z.object({ city: z.string(), unit: z.enum(["celsius", "fahrenheit"]) }),
      }),
    ],
    tool_choice: "required",
    temperature: 0,
    max_tokens: 120,
  });
  const call = completion.choices[0].message.tool_calls[0];
  assert.equal(call.function.name, "get_weather");
  assert.equal(typeof call.function.parsed_arguments.city, "string");
  assert.ok(["celsius", "fahrenheit"].includes(call.function.parsed_arguments.unit));
});
