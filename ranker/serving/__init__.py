"""Serving the ranker over HTTP (`llmcf serve`): owns the `/v1/rank` API and its error contract (`app`), the model version
being served and its hot swap (`models`), the example pool the ICT module retrieves from, the stream workers' Qdrant
collection or the ranker's own synced replica (`pool`), request scoring (`scoring`), the process's metrics (`metrics`)
and the uvicorn process (`server`)."""
