"""Talks to `earshot serve` with the official OpenAI Python client (tests/serve.rs runs it
with the versions pinned in openai-requirements.txt) and prints what it got as one JSON
object: the model list, a chat answer, the same answer streamed, a refused request, and the
same clip through /v1/audio/transcriptions in three response formats."""
import base64
import json
import sys

import openai
from openai import OpenAI

base, clip = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key="not-needed", max_retries=0)
data = base64.b64encode(open(clip, "rb").read()).decode()
messages = [{"role": "user", "content": [
    {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
]}]
out = {"models": [m.id for m in client.models.list().data]}
r = client.chat.completions.create(model="tones", messages=messages, max_tokens=24)
out["text"] = r.choices[0].message.content
out["finish"] = r.choices[0].finish_reason
out["usage"] = [r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens]
stream = client.chat.completions.create(
    model="tones", messages=messages, max_tokens=24, stream=True,
    stream_options={"include_usage": True})
parts, ids, usage = [], set(), None
for chunk in stream:
    ids.add(chunk.id)
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = chunk.usage.total_tokens
out["stream_text"] = "".join(parts)
out["stream_ids"] = len(ids)
out["stream_usage"] = usage
try:
    client.chat.completions.create(
        model="tones", messages=[{"role": "user", "content": "no audio here"}])
    out["refused"] = None
except openai.BadRequestError as e:
    out["refused"] = [e.status_code, e.body["message"] if isinstance(e.body, dict) else str(e.body)]
with open(clip, "rb") as f:
    out["transcript"] = client.audio.transcriptions.create(model="tones", file=f).text
with open(clip, "rb") as f:
    v = client.audio.transcriptions.create(model="tones", file=f, response_format="verbose_json")
    out["verbose"] = [v.text, v.duration, [s.text for s in v.segments]]
with open(clip, "rb") as f:
    out["plain"] = client.audio.transcriptions.create(model="tones", file=f, response_format="text")
print(json.dumps(out))
