// The official OpenAI Node SDK against ARK, with its defaults: chat, streaming, embeddings, transcription, errors.
// Run by tests/compat/test_node_sdk.py, which starts the stack and passes ARK_BASE_URL, ARK_API_KEY,
// ARK_SPEECH_PATH and ARK_SPEECH_REFERENCE.
import assert from "node:assert/strict";
import fs from "node:fs";
import { test } from "node:test";

import OpenAI from "openai";

import { CHAT_MODEL, client, cosine, env } from "./support.mjs";

const QUESTION = [
  { role: "system", content: "You are a helpful assistant." },
  { role: "user", content: "Please name the capital of France." },
];
const ANCHOR = "A man is eating food.";
const PARAPHRASE = "A man is eating a piece of bread.";
const UNRELATED = "The stock market fell sharply today.";

test("chat completion answers and reports usage", async () => {
  const reply = await client().chat.completions.create({
    model: CHAT_MODEL,
    messages: QUESTION,
    temperature: 0,
    max_tokens: 40,
  });
  assert.match(reply.choices[0].message.content, /Paris/);
  assert.equal(reply.choices[0].finish_reason, "stop");
  assert.ok(reply.usage.prompt_tokens > 0 && reply.usage.completion_tokens > 0);
});

test("a raw stream and the stream helper assemble the same answer", async () => {
  const request = { model: CHAT_MODEL, messages: QUESTION, temperature: 0, max_tokens: 40 };
  const whole = (await client().chat.completions.create(request)).choices[0].message.content;

  const stream = await client().chat.completions.create({
    ...request,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let usage = null;
  let finish = null;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices) {
      text += choice.delta.content ?? "";
      finish = choice.finish_reason ?? finish;
    }
  }
  assert.equal(text, whole);
  assert.equal(finish, "stop");
  assert.ok(usage.completion_tokens > 0);

  // The SDK's helper accumulates the deltas itself and checks their shape as it goes.
  const runner = client().chat.completions.stream(request);
  const deltas = [];
  runner.on("content", (delta) => deltas.push(delta));
  const final = await runner.finalChatCompletion();
  assert.equal(final.choices[0].message.content, whole);
  assert.equal(deltas.join(""), whole);
});

test("embeddings with the SDK's defaults (base64 on the wire, floats to the caller)", async () => {
  const result = await client().embeddings.create({
    model: "text-embedding-3-small",
    input: [ANCHOR, PARAPHRASE, UNRELATED],
  });
  const vectors = result.data.map((item) => item.embedding);
  assert.deepEqual(
    result.data.map((item) => item.index),
    [0, 1, 2],
  );
  for (const vector of vectors) {
    assert.equal(vector.length, 384);
    assert.ok(Math.abs(Math.hypot(...vector) - 1) < 1e-5);
  }
  assert.ok(cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3);

  const asFloat = await client().embeddings.create({
    model: "text-embedding-3-small",
    input: ANCHOR,
    encoding_format: "float",
  });
  const decoded = Float32Array.from(vectors[0]);
  assert.deepEqual(Array.from(decoded), Array.from(Float32Array.from(asFloat.data[0].embedding)));
});

// The recording and its transcript come from tests/support/audio.py (SPEECH), judged as the Python suite judges it.
function words(text) {
  return text.toLowerCase().replace(/'/g, "").replace(/[^\p{L}\p{N}\s]/gu, " ").split(/\s+/).filter(Boolean);
}

function wordErrorRate(reference, hypothesis) {
  const ref = words(reference);
  const hyp = words(hypothesis);
  let previous = Array.from({ length: hyp.length + 1 }, (_, j) => j);
  ref.forEach((r, i) => {
    const current = [i + 1];
    hyp.forEach((h, j) => current.push(Math.min(previous[j + 1] + 1, current[j] + 1, previous[j] + (r === h ? 0 : 1))));
    previous = current;
  });
  return previous[hyp.length] / Math.max(ref.length, 1);
}

test("transcription of a real recording", async () => {
  const result = await client().audio.transcriptions.create({
    file: fs.createReadStream(env("ARK_SPEECH_PATH")),
    model: "whisper-1",
  });
  const wer = wordErrorRate(env("ARK_SPEECH_REFERENCE"), result.text);
  assert.ok(wer <= 0.1, `word error rate ${wer} for ${JSON.stringify(result.text)}`);
});

test("a wrong key is an AuthenticationError carrying the request id", async () => {
  const bad = new OpenAI({ baseURL: env("ARK_BASE_URL"), apiKey: "sk-wrong-key-000000", maxRetries: 0 });
  await assert.rejects(
    bad.chat.completions.create({ model: CHAT_MODEL, messages: QUESTION }),
    (error) => {
      assert.ok(error instanceof OpenAI.AuthenticationError);
      assert.equal(error.status, 401);
      assert.ok(error.requestID);
      return true;
    },
  );
});

test("an unknown model is a NotFoundError", async () => {
  await assert.rejects(client().chat.completions.create({ model: "gpt-9", messages: QUESTION }), (error) => {
    assert.ok(error instanceof OpenAI.NotFoundError);
    assert.equal(error.code, "model_not_found");
    assert.equal(error.param, "model");
    return true;
  });
});

test("a bad parameter is a BadRequestError naming it", async () => {
  await assert.rejects(
    client().chat.completions.create({ model: CHAT_MODEL, messages: QUESTION, temperature: 5 }),
    (error) => {
      assert.ok(error instanceof OpenAI.BadRequestError);
      assert.equal(error.param, "temperature");
      return true;
    },
  );
});
