"""Training on several processes with torch.distributed: who this process is, and the few
collectives the training loop needs.

torchrun starts one process per device and tells each its place through the environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``). A process started
without those is a world of one, and everything here is a no-op for it, so the single-process
loop runs exactly as before.

The loop does not wrap the student in ``DistributedDataParallel``: one training step calls the
student several times (anchors, candidates, the IEM on each pairing) rather than through a single
``forward``, and only the small LoRA and head weights train. After the micro-steps of a step the
gradients of those weights are summed over the ranks in one flat buffer (``sum_gradients``).

``launch_torchrun`` is how the pipeline (``d2llm train``, the DVC stage, the Prefect flow) runs
the same CLI command under torchrun when ``training.distributed.nproc_per_node`` asks for more
than one process on this machine.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from d2llm.errors import D2LLMError

if TYPE_CHECKING:
    import torch

    from d2llm.config import DistributedConfig

log = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or another launcher of its kind) started."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def env_rank() -> int:
    """This process's global rank from the environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class DistContext:
    """This process's place among the training processes (a world of one by default)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone evaluates, saves, writes checkpoints and reports."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the element-wise sum of ``tensor`` over the ranks (no gradient)."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ranks' ``[n, ...]`` tensors stacked in rank order, ``[world * n, ...]``, WITH gradient.

        The backward pass sends each rank the gradient of its own rows summed over every rank's
        loss, so a loss that reads other ranks' rows still trains the weights that made them.
        """
        if not self.enabled:
            return tensor
        import torch
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor), dim=0)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_parameters(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Rank 0's values of ``parameters`` on every rank (the ranks start from one student)."""
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for param in parameters:
                dist.broadcast(param.data, src=0)

    def sum_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``parameters`` over the ranks, in one collective.

        A parameter without a gradient on this rank (an IEM task branch its groups did not use)
        counts as zero, and keeps no gradient only if no rank has one: the optimiser then treats
        it as one process accumulating all the ranks' groups would.
        """
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist

        device = parameters[0].device
        pieces = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in parameters]
        has_grad = torch.tensor([float(p.grad is not None) for p in parameters], device=device)
        flat = torch.cat([*pieces, has_grad.to(pieces[0].dtype)])
        dist.all_reduce(flat)
        offset = 0
        for param in parameters:
            chunk = flat[offset : offset + param.numel()].view_as(param)
            if param.grad is not None:
                param.grad.copy_(chunk)
            else:
                param.grad = chunk.clone()
            offset += param.numel()
        for param, anywhere in zip(parameters, flat[offset:].tolist(), strict=True):
            if not anywhere:
                param.grad = None


def _backend(cfg: DistributedConfig, device: torch.device) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def distributed_context(cfg: DistributedConfig, device: torch.device) -> Iterator[tuple[DistContext, Any]]:
    """This process's ``DistContext`` and its device for the ``with`` block.

    Under torchrun the process group is started here (NCCL on CUDA, gloo on the CPU; each rank
    on GPU ``LOCAL_RANK``) and torn down after the block: after a barrier when the block
    finished, at once when it failed (the other ranks may be gone). A process group the caller
    started is used and left alone. Outside torchrun: a world of one on ``device``.
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        yield ctx, _rank_device(device, ctx.local_rank)
        return
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        yield DistContext(), device
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _rank_device(device, local_rank)
    backend = _backend(cfg, device)
    if backend == "nccl" and device.type != "cuda":
        raise D2LLMError("training.distributed.backend: nccl needs CUDA devices; use gloo on the CPU")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=cfg.timeout_s))
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank)
    log.info("rank %d of %d (%s on %s)", ctx.rank, ctx.world_size, backend, device)
    finished = False
    try:
        yield ctx, device
        finished = True
    finally:
        if finished:
            dist.barrier()  # no rank tears down while another still talks to it
        dist.destroy_process_group()


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    import torch

    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def launch_torchrun(cli_args: Sequence[str], nproc_per_node: int) -> None:
    """Run ``d2llm <cli_args>`` as ``nproc_per_node`` torchrun workers on this machine; wait for them.

    The caller holds the pipeline lock for the workers. Raises D2LLMError when a worker fails
    (torchrun stops the others then); its stderr went to this process's stderr.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc_per_node}",
        "-m",
        "d2llm.cli",
        *cli_args,
    ]
    log.info("starting %d training processes: %s", nproc_per_node, " ".join(command))
    from d2llm.lock import LOCK_HELD_ENV

    env = {**os.environ, LOCK_HELD_ENV: "1"}  # the caller holds the pipeline lock for the workers
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its warning
    done = subprocess.run(command, env=env, check=False)
    if done.returncode != 0:
        raise D2LLMError(
            f"distributed training failed (torchrun exit code {done.returncode}); the first failing "
            "rank's error is above. A rerun resumes from the last checkpoint."
        )
