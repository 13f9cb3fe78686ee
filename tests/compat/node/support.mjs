// What the Node compatibility tests share: the client as its users create it, and small helpers.
import OpenAI from "openai";

// An OpenAI name, as client code is written: the alias of ARK's embedded chat model.
export const CHAT_MODEL = "gpt-4o-mini";

export function env(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set (tests/compat/test_node_sdk.py sets it)`);
  return value;
}

// Generous, so that a loaded machine slows the suite without failing it; a hang still fails.
export function client() {
  return new OpenAI({ baseURL: env("ARK_BASE_URL"), apiKey: env("ARK_API_KEY"), maxRetries: 0, timeout: 300_000 });
}

export function cosine(a, b) {
  let dot = 0;
  let na = 0;
  let nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return dot / Math.sqrt(na * nb);
}
