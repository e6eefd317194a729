"""How much the teacher's labels say beyond the bi-encoder, per dataset of a labels folder.

For every anchor of every group: does the teacher score the positive above each hard negative
(share of pairs), does the bi-encoder's cosine (the student's start), and how do the two
correlate over the anchor's positive + hard negatives; plus the teacher's mean log-odds of
positives and of hard negatives. Usage:

    python scripts/label_diagnostics.py --labels-dir data/labels [--params params.yaml]
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def diagnostics(labels_dir: str, params_file: str) -> dict[str, dict[str, float]]:
    from d2llm.biencoder import baseline_encoder
    from d2llm.config import load_params
    from d2llm.labelling import load_labels

    labels = load_labels(labels_dir)
    encoder = baseline_encoder(load_params(params_file))
    out: dict[str, dict[str, float]] = {}
    for dataset in dict.fromkeys(labels.groups["dataset"]):
        rows = np.flatnonzero(labels.groups["dataset"].to_numpy() == dataset)
        teacher_wins, cosine_wins, correlations = [], [], []
        log_odds = (labels.hard[rows][..., 0] - labels.hard[rows][..., 1]).numpy()  # [G, B, K+1]
        for g, group in zip(rows, log_odds, strict=True):
            row = labels.groups.iloc[g]
            for i, (anchor, positive, negatives) in enumerate(
                zip(row.anchors, row.positives, row.negatives, strict=True)
            ):
                vectors = encoder.encode([anchor, positive, *negatives])
                cosine = (vectors[1:] @ vectors[0]).numpy()
                teacher_wins.append(float((group[i, 0] > group[i, 1:]).mean()))
                cosine_wins.append(float((cosine[0] > cosine[1:]).mean()))
                correlations.append(float(np.corrcoef(cosine, group[i])[0, 1]))
        out[dataset] = {
            "groups": len(rows),
            "teacher_positive_above_negative": round(float(np.mean(teacher_wins)), 3),
            "cosine_positive_above_negative": round(float(np.mean(cosine_wins)), 3),
            "teacher_cosine_correlation": round(float(np.nanmean(correlations)), 3),
            "teacher_log_odds_positive": round(float(log_odds[..., 0].mean()), 2),
            "teacher_log_odds_negative": round(float(log_odds[..., 1:].mean()), 2),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels-dir", default="data/labels")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    print(json.dumps(diagnostics(args.labels_dir, args.params), indent=1))


if __name__ == "__main__":
    main()
