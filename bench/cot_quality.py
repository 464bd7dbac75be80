"""What the CoTs of the evaluation's pool carry: the LLM CoT file against template CoTs for the same rows (issue 15).

    python -m bench.cot_quality [--dataset ml-1m] [--cot-file data/cots/ml-1m-llm-cots.jsonl.gz] [--threads 1]

For the rows of the LLM CoT file (`llmcf cots`), each CoT source (the LLM's text; the template backend's, NOT an LLM)
embedded with the pool's MiniLM, as the ICT module sees it:
- length: mean words and, for the LLM, the share of CoTs cut at the decoding budget (completion tokens = max);
- diversity: mean cosine between the embeddings of distinct rows (1.0 = all the same text);
- label in the text: test AUC of a logistic regression from the embedding to the row's label (rows split 50/50 by
  seed 0): a CoT that restates its label reaches ~1.0, which the ICT module's label token already gives it;
- beyond the label: the same probe to the row's user's share of liked items in their history (above or below the
  median), and to whether the target item is liked by most of its earlier raters (above or below the median): what
  a rationale about the user's taste and the item could carry that the label alone does not.
Figures depend only on the file and the seed; the printed protocol names both.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def probe_auc(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Test AUC of a logistic regression from `x` to binary `y`, on a seeded 50/50 split of the rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    order = np.random.default_rng(seed).permutation(len(y))
    train, test = order[: len(y) // 2], order[len(y) // 2 :]
    model = LogisticRegression(max_iter=2000).fit(x[train], y[train])
    return float(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1]))


def mean_pairwise_cosine(x: np.ndarray) -> float:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    total = unit.sum(axis=0)
    n = len(unit)
    return float((total @ total - n) / (n * (n - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-1m", choices=["ml-100k", "ml-1m"])
    parser.add_argument("--cot-file", help="default data/cots/<dataset>-llm-cots.jsonl.gz")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from pathlib import Path

    from llmcf.settings import Settings
    from ranker.cot_pool import _generate_cots, llm_file_pool
    from ranker.data import movielens_corpus
    from ranker.dataset import Samples, time_split
    from ranker.llm_cots import default_path, read_cots, read_manifest

    started = time.perf_counter()
    path = Path(args.cot_file) if args.cot_file else default_path(args.dataset)
    settings = Settings.from_env()
    cache_dir = settings.home / "cache" / "ranker"
    corpus = movielens_corpus(args.dataset)
    samples = Samples.of(corpus, cache_dir)
    train = time_split(corpus, None, None, seed=0)[0].rows
    quiet = lambda _line: None  # noqa: E731
    pools = {"llm": llm_file_pool(samples, train, path, cache_dir, quiet),
             "template": llm_file_pool(samples, train, path, cache_dir, quiet, cots="template")}
    rows = pools["llm"].rows
    records = read_cots(path)
    manifest = read_manifest(path)
    texts = {"llm": [records[corpus.sample_key(r)]["cot"] for r in rows.tolist()]}
    texts["template"] = _generate_cots(samples, rows, "template")

    labels = corpus.label[rows].astype(int)
    history_labels = samples.history_labels[rows]
    known = samples.histories[rows] >= 0
    liked_share = np.where(known.any(axis=1), (history_labels * known).sum(axis=1) / np.maximum(known.sum(axis=1), 1), 0.5)
    taste = (liked_share > np.median(liked_share)).astype(int)
    # The item's earlier raters: the share who liked it, from the corpus rows before this one (rows are sorted).
    position = {row: i for i, row in enumerate(rows.tolist())}
    item_counts: dict[int, list[int]] = {}
    item_share = np.full(len(rows), 0.5)
    for row in range(int(rows.max()) + 1):
        counts = item_counts.setdefault(int(corpus.item[row]), [0, 0])
        if row in position and counts[1]:
            item_share[position[row]] = counts[0] / counts[1]
        counts[0] += int(corpus.label[row])
        counts[1] += 1
    appeal = (item_share > np.median(item_share)).astype(int)

    max_tokens = manifest.get("generator", {}).get("decoding", {}).get("max_new_tokens")
    cut = np.mean([records[corpus.sample_key(r)]["completion_tokens"] >= (max_tokens or 10**9) for r in rows.tolist()])
    print(f"protocol: {args.dataset}, the {len(rows):,} rows of {path.name} (model {manifest['generator']['model']}, "
          f"decoding {manifest.get('generator', {}).get('decoding')}); embeddings {pools['llm'].describe()['embedding_model']};"
          f" probes: logistic regression, rows split 50/50 (seed 0); {len(rows):,} rows, {labels.mean():.1%} liked")
    print(f"{'source':<10} {'words':>6} {'cut':>6} {'cosine':>7} {'AUC label':>10} {'AUC taste':>10} {'AUC item':>9}")
    for name, pool in pools.items():
        x = np.stack(pool.cots)
        words = np.mean([len(t.split()) for t in texts[name]])
        print(f"{name:<10} {words:>6.0f} {cut if name == 'llm' else 0.0:>6.1%} {mean_pairwise_cosine(x):>7.3f} "
              f"{probe_auc(x, labels):>10.3f} {probe_auc(x, taste):>10.3f} {probe_auc(x, appeal):>9.3f}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
