// The Responses API from Node: the official SDK (responses.stream + finalResponse, parse with zod) and the Vercel
// AI SDK's default OpenAI provider, which calls /responses (generateText, streamText with a tool over several
// steps, generateObject, and a second turn in which the SDK sends earlier assistant turns as item_reference).
// Run by tests/compat/test_node_responses.py.
import assert from "node:assert/strict";
import { test } from "node:test";

import { createOpenAI } from "@ai-sdk/openai";
import { generateObject, generateText, stepCountIs, streamText, tool } from "ai";
import { zodTextFormat } from "openai/helpers/zod";
import { z } from "zod";

import { CHAT_MODEL, client, env } from "./support.mjs";

test("responses.stream and finalResponse", async () => {
  const stream = client().responses.stream({ model: CHAT_MODEL, input: "Say hello.", max_output_tokens: 16 });
  let text = "";
  let sequence = -1;
  for await (const event of stream) {
    assert.equal(event.sequence_number, sequence + 1);
    sequence = event.sequence_number;
    if (event.type === "response.output_text.delta") text += event.delta;
  }
  const final = await stream.finalResponse();
  assert.ok(["completed", "incomplete"].includes(final.status));
  assert.equal(final.output_text, text);
  assert.ok(text.length > 0);
});

test("responses.parse with zod", async () => {
  const City = z.object({ name: z.string().max(40), country: z.string().max(40) });
  const response = await client().responses.parse({
    model: CHAT_MODEL,
    input: "Name a city in Italy.",
    text: { format: zodTextFormat(City, "city") },
    max_output_tokens: 60,
    temperature: 0,
  });
  assert.equal(typeof response.output_parsed.name, "string");
  assert.equal(typeof response.output_parsed.country, "string");
});

test("previous_response_id from the Node SDK reuses the chain", async () => {
  const first = await client().responses.create({ model: CHAT_MODEL, input: "My name is Ada.", max_output_tokens: 16 });
  const second = await client().responses.create({
    model: CHAT_MODEL,
    previous_response_id: first.id,
    input: "What is my name?",
    max_output_tokens: 16,
  });
  assert.ok(second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens);
});

// The AI SDK's provider as its docs create it, with every request body recorded.
function provider() {
  const bodies = [];
  const openai = createOpenAI({
    baseURL: env("ARK_BASE_URL"),
    apiKey: env("ARK_API_KEY"),
    fetch: async (url, init) => {
      if (init?.body) bodies.push({ url: String(url), body: JSON.parse(init.body) });
      return fetch(url, init);
    },
  });
  return { openai, bodies };
}

test("AI SDK generateText calls /responses", async () => {
  const { openai, bodies } = provider();
  const result = await generateText({ model: openai(CHAT_MODEL), prompt: "Say hello.", maxOutputTokens: 16 });
  assert.ok(result.text.length > 0);
  assert.ok(bodies[0].url.endsWith("/responses"));
});

test("AI SDK streamText with a tool over several steps", async () => {
  const { openai } = provider();
  let called = 0;
  const result = streamText({
    model: openai(CHAT_MODEL),
    prompt: "What is the weather in Paris?",
    tools: {
      weather: tool({
        description: "Current weather of a city",
        inputSchema: z.object({ city: z.string() }),
        execute: async ({ city }) => {
          called += 1;
          return { city, celsius: 21 };
        },
      }),
    },
    // Later steps keep the tools offered (auto): a step without them would render another prompt.
    prepareStep: ({ stepNumber }) => ({ toolChoice: stepNumber === 0 ? "required" : "auto" }),
    stopWhen: stepCountIs(3),
    maxOutputTokens: 40,
    temperature: 0,
  });
  for await (const part of result.fullStream) assert.notEqual(part.type, "error", JSON.stringify(part));
  const steps = await result.steps;
  assert.ok(called >= 1);
  assert.ok(steps.length >= 2);
  assert.equal(steps[0].toolCalls[0].toolName, "weather");
  assert.ok(steps.at(-1).usage.inputTokens > 0);
});

test("AI SDK generateObject", async () => {
  const { openai } = provider();
  const { object } = await generateObject({
    model: openai(CHAT_MODEL),
    // Bounded strings and greedy decoding: unbounded, a tiny model may write one string until the token budget ends.
    schema: z.object({ name: z.string().max(40), country: z.string().max(40) }),
    prompt: "Name a city in Spain.",
    temperature: 0,
    maxOutputTokens: 60,
  });
  assert.equal(typeof object.name, "string");
});

test("AI SDK second turn sends item_reference and is served", async () => {
  const { openai, bodies } = provider();
  const first = await generateText({ model: openai(CHAT_MODEL), prompt: "Say yes.", maxOutputTokens: 8 });
  const messages = [{ role: "user", content: "Say yes." }, ...first.response.messages, { role: "user", content: "Again." }];
  const second = await generateText({ model: openai(CHAT_MODEL), messages, maxOutputTokens: 8 });
  const input = bodies.at(-1).body.input;
  assert.ok(input.some((item) => item.type === "item_reference"), JSON.stringify(input));
  assert.ok(second.text.length > 0);
  assert.ok(second.usage.cachedInputTokens > 0);
});
