"""A conversation in a stateful session: the client keeps the ark_session_id cookie (the official client does that
by itself), so each follow-up turn only computes its new tokens (`cached_tokens` grows); then the session is ended."""

import os

import httpx
from openai import OpenAI

client = OpenAI(base_url=os.environ.get("ARK_BASE_URL", "http://127.0.0.1:8080/v1"), api_key=os.environ["ARK_API_KEY"])
messages = [{"role": "system", "content": "You are a helpful assistant."}]
for question in ["What is the capital of France?", "And of Germany?", "And of Italy?"]:
    messages.append({"role": "user", "content": question})
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, temperature=0)
    reply = raw.parse()
    messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    usage = reply.usage
    print(
        f"[{raw.headers.get('x-ark-session')}] {question} -> {reply.choices[0].message.content} "
        f"({usage.prompt_tokens_details.cached_tokens} of {usage.prompt_tokens} prompt tokens reused)"
    )

print("session:", client.get("/sessions/current", cast_to=httpx.Response).json()["id"])
client.delete("/sessions/current", cast_to=httpx.Response)
print("ended")
