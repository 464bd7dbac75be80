"""Continuous updates of the ranker (`llmcf update`): owns the rounds that follow the stored stream, fine-tune the
serving model on the newest window, validate it against the serving model on a recent holdout, and promote or reject
it through `model_versions` rows (the only channel to `llmcf serve`), and the updater's metrics.

- `finetune`: growing a feature space and a model to new users, items and tags, and fine-tuning (also used by the
  streaming evaluation, so it measures exactly what the updater does);
- `rounds`: one update round, from reading the database to promotion;
- `service`: the loop, its schedule and its failure handling;
- `metrics`: the `llmcf_updater_*` Prometheus metrics.
"""
