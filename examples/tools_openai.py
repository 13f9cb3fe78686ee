"""A forced tool call (arguments always parse: decoding is grammar-constrained) and JSON-schema output."""

import json
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("ARK_BASE_URL", "http://127.0.0.1:8080/v1"), api_key=os.environ["ARK_API_KEY"])
tools = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
reply = client.chat.completions.create(
    model="gpt-4o",
    messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    tools=tools,
    tool_choice="required",
    temperature=0,
)
call = reply.choices[0].message.tool_calls[0]
print("tool call:", call.function.name, json.loads(call.function.arguments))

schema = {
    "type": "object",
    # Bounded fields: the output always fits in max_tokens, so it always parses.
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
reply = client.chat.completions.create(
    model="gpt-4o",
    messages=[{"role": "user", "content": "Describe a cat."}],
    temperature=0,
    max_tokens=60,
    response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": schema, "strict": True}},
)
print("structured:", json.loads(reply.choices[0].message.content))
