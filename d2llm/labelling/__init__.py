"""Training groups, built once, and the teacher's scores of them, written in resumable shards.

The package, bottom layer first (each module imports only from the layers below it):

- ``shards``: the files of a labels folder (groups, score shards, manifest) and ``load_labels``;
- ``plan``: building the groups, gating the datasets on the teacher's dev report,
  ``plan_labelling`` (which shards still need scores), ``write_shard``, ``finalise_labelling``;
- ``scoring``: ``score_groups`` and ``ShardScorer``, the teacher (and fusion) scoring a shard;
- ``ray_executor``, ``ray_job``: shards scored by Ray actors, or the whole labelling as a Ray job;
- ``executors``: the local executor and ``label_groups``, which runs plan, executor, finalise.

This ``__init__`` only re-exports the public API; no module of the package imports it.
"""

from d2llm.labelling.executors import label_groups, score_locally
from d2llm.labelling.plan import (
    LabellingPlan,
    build_groups,
    finalise_labelling,
    plan_labelling,
    select_distilled,
    teacher_identity,
    write_shard,
)
from d2llm.labelling.scoring import ShardScorer, load_scoring_teacher, score_groups
from d2llm.labelling.shards import GROUPS_FILE, MANIFEST_FILE, SHARD_PATTERN, Labels, load_labels

__all__ = [
    "GROUPS_FILE",
    "MANIFEST_FILE",
    "SHARD_PATTERN",
    "LabellingPlan",
    "Labels",
    "ShardScorer",
    "build_groups",
    "finalise_labelling",
    "label_groups",
    "load_labels",
    "load_scoring_teacher",
    "plan_labelling",
    "score_groups",
    "score_locally",
    "select_distilled",
    "teacher_identity",
    "write_shard",
]
