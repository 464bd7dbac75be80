"""Stage 1, the stream workers (Faust): consume `items` and `interactions`, validate, keep user histories, persist,
and decide which samples get a chain of thought (to `cot-requests`); consume `cot-results` and store them."""
