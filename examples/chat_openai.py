"""A chat completion and a streamed one, with the official OpenAI client pointed at ARK."""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("ARK_BASE_URL", "http://127.0.0.1:8080/v1"), api_key=os.environ["ARK_API_KEY"])
messages = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]

reply = client.chat.completions.create(model="gpt-4o", messages=messages, temperature=0)
print(reply.choices[0].message.content)
print("usage:", reply.usage.prompt_tokens, "prompt +", reply.usage.completion_tokens, "completion tokens")

for chunk in client.chat.completions.create(model="gpt-4o", messages=messages, stream=True, max_tokens=30):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
