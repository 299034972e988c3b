"""``multitoken serve``: an OpenAI-compatible HTTP server over continuous batching.

:mod:`~multitoken.serve.engine` decodes every request in flight as rows of one ragged batch that
requests join between steps and leave when done (the phases of :mod:`multitoken.decode.phases`,
each row with its own sampling settings); :mod:`~multitoken.serve.app` is the HTTP side
(FastAPI + uvicorn): the OpenAI routes, streaming, errors, metrics.
"""
