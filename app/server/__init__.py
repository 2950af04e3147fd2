"""`moechat serve`'s HTTP layer: OpenAI- and Ollama-compatible routes on one engine worker.

Only `moechat serve` imports this package (and with it Starlette and uvicorn): `ask` and the
chat app never pay for a web stack.
"""
