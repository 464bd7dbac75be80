"""The default `/metrics` port of each long-running command (`LLMCF_METRICS_PORT` overrides it): one source for the
commands, the demo, the settings catalogue and compose. The ranker serves `/metrics` on its API port."""

WORKER_METRICS_PORT = 9101
GENERATOR_METRICS_PORT = 9102
UPDATER_METRICS_PORT = 9103
