"""Parse every llm-sim response shape with the real `openai` and `anthropic` SDKs.

Usage: python sdk_smoke.py http://127.0.0.1:PORT   (needs `pip install openai anthropic`)
Exits non-zero on the first mismatch. The Envoy lab runs the same SDKs through
the filters; this checks the simulator alone.
"""

import sys

import anthropic
import openai

base = sys.argv[1].rstrip("/")
model = sys.argv[2] if len(sys.argv) > 2 else "sim-model"
oa = openai.OpenAI(base_url=base + "/v1", api_key="sk-sim", max_retries=0, timeout=10)
an = anthropic.Anthropic(base_url=base, api_key="sk-sim", max_retries=0, timeout=10)
msgs = [{"role": "user", "content": "Say something short, please."}]

chat = oa.chat.completions.create(model=model, messages=msgs, max_tokens=4)
assert chat.model == model and chat.choices[0].finish_reason == "length", chat
assert chat.usage.completion_tokens == len(chat.choices[0].message.content.split()), chat

stream = oa.chat.completions.create(
    model=model, messages=msgs, stream=True, stream_options={"include_usage": True}
)
deltas, usage = [], None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
        assert chunk.choices == []
    for c in chunk.choices:
        if c.delta.content:
            deltas.append(c.delta.content)
assert usage is not None and usage.completion_tokens == len(deltas), (usage, deltas)

comp = oa.completions.create(model=model, prompt="Once upon", max_tokens=3)
assert comp.usage.completion_tokens == 3 and comp.choices[0].finish_reason == "length", comp
pieces = [c.choices[0].text for c in oa.completions.create(model=model, prompt="x", stream=True) if c.choices]
assert len(pieces) == comp.usage.completion_tokens or pieces, pieces

assert [m.id for m in oa.models.list()][0] == model

msg = an.messages.create(model=model, max_tokens=5, messages=msgs)
assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 5, msg
with an.messages.stream(model=model, max_tokens=1000, messages=msgs) as s:
    texts = [t for t in s.text_stream]
    final = s.get_final_message()
assert final.usage.output_tokens == len(texts) and final.stop_reason == "end_turn", final
assert final.usage.input_tokens == msg.usage.input_tokens
assert [m.id for m in an.models.list()][0] == model

try:
    oa.chat.completions.create(model="nope", messages=msgs)
    raise SystemExit("expected a 404")
except openai.NotFoundError as e:
    assert e.status_code == 404
try:
    an.messages.create(model="nope", max_tokens=5, messages=msgs)
    raise SystemExit("expected a 404")
except anthropic.NotFoundError as e:
    assert e.status_code == 404
print("sdk smoke: ok")
