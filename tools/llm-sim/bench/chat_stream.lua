-- wrk script: small streamed chat completions (16 tokens + include_usage) against llm-sim.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"sim-model","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Hello, how are you today?"}],"max_tokens":16}'
