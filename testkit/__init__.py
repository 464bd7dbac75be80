"""Helpers that the test suite and the benchmarks share, so that neither imports the other.

`processes` runs `llmcf` commands as subprocesses, `kafka` tells where a consumer group's commits stand, `windows`
computes what the worker must produce for a replayed MovieLens window, `threads` runs a service's `run()` in a thread,
`http` serves fakes of remote HTTP services, and `fuzz` draws malformed records and checks what the worker did with
them. Pytest fixtures stay in `tests/fixtures/`; this package holds no fixtures.
"""
