"""Serving the ranker over HTTP (`llmcf serve`): owns the `/v1/rank` API and its error contract (`app`), the model version
being served and its hot swap (`models`), the in-memory example pool and its sync from storage (`pool`), each
version's encoded examples and their tokens (`examples`), request scoring (`scoring`), the process's metrics
(`metrics`) and the uvicorn process (`server`)."""
