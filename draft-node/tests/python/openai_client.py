"""Drives a running draft node with the official `openai` client; prints one JSON object.

Usage: openai_client.py <base_url> <model> <prompt> <chat_user_message> <max_tokens>
"""
import json
import sys

import openai

base_url, model, prompt, user, max_tokens = sys.argv[1:6]
max_tokens = int(max_tokens)
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
out = {}

out["models"] = [m.id for m in client.models.list().data]

c = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
out["completion"] = c.choices[0].text
out["completion_finish"] = c.choices[0].finish_reason
out["completion_usage"] = c.usage.completion_tokens

chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": user}],
    max_tokens=max_tokens,
    temperature=0,
)
out["chat"] = chat.choices[0].message.content
out["chat_role"] = chat.choices[0].message.role

text = ""
usage = None
finish = None
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": user}],
    max_tokens=max_tokens,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens
    for choice in chunk.choices:
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
out["chat_stream"] = text
out["chat_stream_finish"] = finish
out["chat_stream_usage"] = usage

text = ""
for chunk in client.completions.create(
    model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
):
    for choice in chunk.choices:
        text += choice.text
out["completion_stream"] = text

try:
    client.completions.create(model="no-such-model", prompt=prompt, max_tokens=4)
    out["unknown_model_error"] = None
except openai.NotFoundError as e:
    out["unknown_model_error"] = e.status_code

print(json.dumps(out))
