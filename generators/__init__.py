"""Stage 2, the generator pool: consume `cot-requests`, build the LLM-CF prompt, run an LLM backend, embed the chain of
thought, and publish `cot-results`."""
