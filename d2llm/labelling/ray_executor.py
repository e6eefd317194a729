"""The Ray executor of labelling: actors that each load the teacher once and score whole shards.

``score_on_ray`` takes a plan (d2llm.labelling.plan.plan_labelling) and scores its missing shards on
``labelling.ray.num_workers`` actors. The driver (this process) hands one shard at a time to
each idle actor, gets the shard's tensors back and writes the shard file itself, so the labels
folder only has to exist where the driver runs, and the shard files stay the checkpoint: a
rerun on any executor skips what is written.

A shard whose actor dies (a killed process, a lost node, out of memory) goes back to the queue
and is scored by another actor; a replacement actor is started in the dead one's place (at most
``num_workers`` replacements per run, whatever the number of actors first started), and a shard
is tried at most ``max_attempts`` times. A replacement gets no shard before it has answered a
ready call (teacher loaded): one that cannot start is dropped, without costing a shard an
attempt, and counts as a replacement. An ordinary exception raised while scoring (bad data, a
bug) is not retried: it is raised here.

The cluster: ``labelling.ray.address``, else ``RAY_ADDRESS``, else a local cluster started for
this run and shut down after it. A process that has already called ``ray.init`` keeps its
cluster. Workers must be able to import d2llm and read the teacher folder at the same path
(installed on every node, a shared file system); docs/distributed.md.

Ray is imported only here, inside functions: the ``distributed`` extra installs it.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import Counter, deque
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2llm.errors import ArtifactError, ConfigError, ModelError
from d2llm.labelling.plan import LabellingPlan, begin_scoring, describe_format, number_format, write_shard
from d2llm.labelling.scoring import ShardScorer

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pandas as pd
    import torch

    from d2llm.config import Params, RayExecutorConfig

log = logging.getLogger(__name__)

WORKER_NAME = "d2llm-labeller"  # actors are named WORKER_NAME-<run>-<n> (ray.util.list_named_actors)
_runs = itertools.count()


class LabellingWorker:
    """The body of one Ray actor: a ShardScorer loaded once, scoring one shard per call."""

    def __init__(self, params: Params, teacher_dir: str, torch_threads: int) -> None:
        # Quiet workers: no progress bars or per-batch library chatter in the driver's output.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the weight-loading bar ignores TQDM_DISABLE

        if params.labelling.ray.gpus_per_worker == 0:
            torch.set_num_threads(torch_threads)
        self.scorer = ShardScorer(params, teacher_dir)

    def scoring_info(self) -> dict[str, str]:
        return self.scorer.scoring_info()

    def score(self, groups: pd.DataFrame) -> dict[str, torch.Tensor]:
        return self.scorer.score(groups)


def score_on_ray(
    plan: LabellingPlan,
    params: Params,
    teacher_dir: str | Path,
    worker_class: type[LabellingWorker] = LabellingWorker,
    overwrite: bool = False,
) -> tuple[dict[str, Any], dict[str, str] | None]:
    """Score ``plan.missing`` on Ray actors and write each shard; returns run stats and scoring info.

    ``worker_class`` may be a subclass of LabellingWorker (tests slow it down to kill one mid-run).
    ``overwrite``: shards in place scored in another number format are scored again
    (``plan.begin_scoring``); without it that is an error.
    """
    cfg = params.labelling.ray
    if not plan.missing:
        return {"executor": "ray", "workers": 0}, None
    require_ray("labelling.executor: ray")
    with ray_cluster(cfg):
        pool = _WorkerPool(worker_class, params, str(Path(teacher_dir).resolve()), cfg)
        try:
            return pool.run(plan, overwrite), pool.scoring
        finally:
            pool.close()


def require_ray(what: str) -> None:
    """A clear error when Ray (the ``distributed`` extra) is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs Ray: pip install -e '.[distributed]'") from None


@contextmanager
def ray_cluster(cfg: RayExecutorConfig) -> Iterator[None]:
    """Connect to the configured cluster, or start a local one for the block (shut down after it)."""
    import ray

    if ray.is_initialized():  # the caller's own cluster (a session, a test, a Ray job's driver)
        yield
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    settings: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address is None:
        settings.update(num_cpus=cfg.local_cpus, include_dashboard=False)
        if cfg.temp_dir:
            settings["_temp_dir"] = str(Path(cfg.temp_dir).resolve())
        log.info("starting a local Ray cluster for labelling (no labelling.ray.address or RAY_ADDRESS)")
    else:
        log.info("connecting to the Ray cluster at %s", address)
    try:
        ray.init(address=address, **settings)
    except ConnectionError as err:
        raise ConfigError(
            f"cannot reach the Ray cluster at {address!r} (labelling.ray.address): {err}"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


class _WorkerPool:
    """Actors, the shard queue and the bookkeeping of one run (one shard in flight per actor)."""

    def __init__(self, worker_class: type, params: Params, teacher_dir: str, cfg: RayExecutorConfig) -> None:
        import ray

        self.cfg = cfg
        self.remote_class = ray.remote(worker_class)
        self.args = (params, teacher_dir, cfg.torch_threads)
        self.run_id = f"{os.getpid()}-{next(_runs)}"
        self.started = 0
        self.replacements = 0  # at most cfg.num_workers per run
        self.starting: dict[Any, Any] = {}  # ready call -> replacement actor loading the teacher
        self.actors: list[Any] = []
        self.scoring: dict[str, str] | None = None

    def _start_actor(self) -> Any:
        actor = self.remote_class.options(
            name=f"{WORKER_NAME}-{self.run_id}-{self.started}",
            num_cpus=self.cfg.cpus_per_worker,
            num_gpus=self.cfg.gpus_per_worker,
            max_restarts=0,  # a dead actor's shard is requeued here, not replayed by Ray
        ).remote(*self.args)
        self.started += 1
        self.actors.append(actor)
        return actor

    def _start_all(self, count: int) -> list[Any]:
        """Start ``count`` actors and wait until each has loaded the teacher (errors surface here)."""
        import ray
        from ray.exceptions import RayActorError

        actors = [self._start_actor() for _ in range(count)]
        try:
            infos = ray.get([a.scoring_info.remote() for a in actors])
        except RayActorError as err:
            raise ModelError(f"the Ray labelling workers could not load the teacher: {err}") from None
        # Described in words: a set of strings sorts for the message (a None beside a string would not).
        formats = {describe_format(info) for info in infos}
        if len(formats) > 1:  # e.g. nodes with and without bf16: their shards would mix formats
            raise ArtifactError(
                f"the Ray labelling workers would score in different number formats ({sorted(formats)}): "
                "run them on one kind of node, or set $D2LLM_CPU_BF16 the same on every node"
            )
        self.scoring = infos[0]
        return actors

    def run(self, plan: LabellingPlan, overwrite: bool = False) -> dict[str, Any]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        workers = min(self.cfg.num_workers, len(plan.missing))
        started_at = time.perf_counter()
        idle = self._start_all(workers)
        begin_scoring(plan, self.scoring, overwrite)  # the workers' number format, known now
        scoring_from = time.perf_counter()
        queue = deque(plan.missing)
        attempts: Counter[int] = Counter()
        in_flight: dict[Any, tuple[Any, int]] = {}
        lost = retried = 0
        from tqdm.auto import tqdm

        progress = tqdm(total=len(plan.missing), desc="labelling shards (ray)", leave=False)
        while queue or in_flight:
            while idle and queue:
                actor, shard = idle.pop(), queue.popleft()
                attempts[shard] += 1
                in_flight[actor.score.remote(plan.shard_groups(shard))] = (actor, shard)
            if not in_flight and not self.starting:
                raise ArtifactError(
                    f"no Ray labelling worker is left ({self.replacements} replacements started, at most "
                    f"labelling.ray.num_workers = {self.cfg.num_workers}); shards {list(queue)[:10]} unscored"
                )
            [ready], _ = ray.wait([*in_flight, *self.starting], num_returns=1)
            if ready in self.starting:
                idle += self._checked_replacement(ready)
                continue
            actor, shard = in_flight.pop(ready)
            try:
                tensors = ray.get(ready)
            except RayTaskError as err:  # the scoring code raised: not the worker's fault, not retried
                raise err.as_instanceof_cause() from None
            except RayActorError as err:
                lost += 1
                self._forget(actor)
                if attempts[shard] >= self.cfg.max_attempts:
                    raise ArtifactError(
                        f"shard {shard} lost its Ray worker {attempts[shard]} times; last: {err}"
                    ) from None
                log.warning("Ray labelling worker died scoring shard %d; it goes to another worker", shard)
                queue.appendleft(shard)
                retried += 1
                self._replace()
                continue
            write_shard(plan, shard, tensors)
            progress.update()
            idle.append(actor)
        progress.close()
        return {
            "executor": "ray",
            "workers": workers,
            "lost_workers": lost,
            "retried_shards": retried,
            "replacement_workers": self.replacements,
            "startup_seconds": scoring_from - started_at,  # actors started, teacher loaded
            "scoring_seconds": time.perf_counter() - scoring_from,
        }

    def _replace(self) -> None:
        """Start a replacement actor, within the bound; it is used once its ready call answers."""
        if self.replacements >= self.cfg.num_workers:
            return
        self.replacements += 1
        actor = self._start_actor()
        self.starting[actor.scoring_info.remote()] = actor

    def _checked_replacement(self, ready: Any) -> list[Any]:
        """The replacement whose ready call answered, as a list of at most one usable actor: one
        that could not start (teacher not loaded, node lost) is dropped and replaced in turn."""
        import ray
        from ray.exceptions import RayActorError

        actor = self.starting.pop(ready)
        try:
            info = ray.get(ready)
        except RayActorError as err:
            log.warning("a replacement Ray labelling worker could not start; it gets no shard: %s", err)
            self._forget(actor)
            self._replace()
            return []
        if self.scoring is not None and number_format(info) != number_format(self.scoring):
            log.warning("a replacement Ray labelling worker scores with %s, the others with %s: it gets no "
                        "shard", number_format(info), number_format(self.scoring))  # fmt: skip
            self._forget(actor)
            return []
        return [actor]

    def _forget(self, actor: Any) -> None:
        if actor in self.actors:
            self.actors.remove(actor)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors.clear()
