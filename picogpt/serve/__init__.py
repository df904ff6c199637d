"""`picogpt serve`: OpenAI's completions protocol (protocol.py: request checks and response shapes),
the engine thread with its jobs and metrics (worker.py), and the Starlette app (http.py: routes,
server-sent events, start-up and shutdown)."""
