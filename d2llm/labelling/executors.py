"""Who scores the shards of a plan: this process, Ray actors or a Ray job; ``label_groups`` picks one.

- local (``score_locally``): the missing shards one after the other, here;
- ray (d2llm.labelling.ray_executor): actors that load the teacher once and score whole shards;
- job (d2llm.labelling.ray_job): the whole ``d2llm label`` as a Ray job in its own environment
  (the vLLM engine), which runs this module's local or Ray executor on the cluster.

Every executor writes the same shard files (d2llm.labelling.shards), so a run resumed on
another executor skips what is written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from d2llm.labelling.plan import (
    LabellingPlan,
    begin_scoring,
    finalise_labelling,
    plan_labelling,
    write_shard,
)
from d2llm.labelling.ray_executor import score_on_ray
from d2llm.labelling.ray_job import run_labelling_job
from d2llm.labelling.scoring import ShardScorer

if TYPE_CHECKING:
    from d2llm.config import Params
    from d2llm.teachers.base import Teacher

log = logging.getLogger(__name__)


def score_locally(plan: LabellingPlan, scorer: ShardScorer) -> dict[str, Any]:
    """The local executor: score the missing shards one after the other in this process."""
    for s in tqdm(plan.missing, desc="labelling shards", leave=False):
        write_shard(plan, s, scorer.score(plan.shard_groups(s)))
    return {"executor": "local", "workers": 1}


def label_groups(
    params: Params,
    negatives_path: str | Path,
    teacher_dir: str | Path,
    out_dir: str | Path,
    overwrite: bool = False,
    teacher: Teacher | None = None,
) -> dict[str, Any]:
    """Build the groups from mined negatives and score them with the teacher, shard by shard.

    ``labelling.job.enabled`` runs all of it as a Ray job in its own environment
    (d2llm.labelling.ray_job); otherwise the shards are scored by ``labelling.executor``: this
    process ("local") or Ray actors ("ray", d2llm.labelling.ray_executor). ``teacher`` may be
    passed already loaded to the local executor (it must be the one saved in ``teacher_dir``,
    whose files identify the labels). Returns counts and what was scored or skipped.
    """
    cfg = params.labelling
    if cfg.job.enabled:
        return run_labelling_job(params, negatives_path, teacher_dir, out_dir, overwrite=overwrite)
    plan = plan_labelling(params, negatives_path, teacher_dir, out_dir, overwrite)
    if plan.complete:
        log.info("labels in %s are complete and current; nothing to do", plan.out_dir)
        return {**plan.summary, "scored_shards": 0, "skipped_shards": len(plan.shards)}
    scoring: dict[str, str] | None = None
    run: dict[str, Any] = {"executor": cfg.executor}
    if plan.missing and cfg.executor == "ray":
        if teacher is not None:
            raise ValueError("a loaded teacher can only be used by the local executor")
        run, scoring = score_on_ray(plan, params, teacher_dir, overwrite=overwrite)
    elif plan.missing:
        scorer = ShardScorer(params, teacher_dir, teacher)
        scoring = scorer.scoring_info()
        begin_scoring(plan, scoring, overwrite)
        run = score_locally(plan, scorer)
    return finalise_labelling(plan, scoring, run)
