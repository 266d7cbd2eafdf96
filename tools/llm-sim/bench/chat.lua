-- wrk script: small non-streamed chat completions against llm-sim.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"sim-model","messages":[{"role":"user","content":"Hello, how are you today?"}],"max_tokens":16}'
