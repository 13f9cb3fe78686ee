"""Chat over plain HTTP with `requests`: a JSON completion, then a server-sent-events stream read by hand."""

import json
import os

import requests

base_url = os.environ.get("ARK_BASE_URL", "http://127.0.0.1:8080/v1")
headers = {"Authorization": f"Bearer {os.environ['ARK_API_KEY']}"}
body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Name the capital of France."}], "temperature": 0}

response = requests.post(f"{base_url}/chat/completions", json=body, headers=headers, timeout=120)
response.raise_for_status()
print(response.json()["choices"][0]["message"]["content"], "| request id:", response.headers["x-request-id"])

with requests.post(
    f"{base_url}/chat/completions", json={**body, "stream": True}, headers=headers, stream=True, timeout=120
) as stream:
    for line in stream.iter_lines(decode_unicode=True):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line.removeprefix("data: "))
        if chunk["choices"]:
            print(chunk["choices"][0]["delta"].get("content") or "", end="", flush=True)
print()
