"""The `llmcf` sub-commands, one module per group, each command's parser builder next to its handler.

`admin`: config, schemas, infra, db. `stream`: replay, tail, worker. `generation`: generate, cots. `training`: train,
update, evaluate, tune. `serving`: serve, demo. `llmcf.cli` assembles them into the top-level parser.
"""
