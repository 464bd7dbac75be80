"""What every stage shares: settings, event contracts, topic names, the dead-letter helper, embedded infrastructure,
the MovieLens replay that plays the platforms' part, and the `llmcf` command line. Stage code lives in `streams/`,
`generators/`, `ranker/` and `storage/`."""
