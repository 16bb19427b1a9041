"""Multi-process training: this process's share of an epoch, gathers, reductions, and the launcher.

diffalign scales through accelerate, never a launcher of its own: ``accelerate launch`` (or
``diffalign train --num-processes N``, which calls it) starts N copies of one training command,
each builds the same ``Trainer``, and the helpers here make the N processes one run with the
global batch of the one-process run:

- every process draws the epoch's prompts identically;
- an algorithm that shards its own data (the online policy-gradient methods: a ``shard``
  attribute) samples its contiguous share of the epoch's images, gathers the rewards so that
  groups split over processes are normalised as on one process, and keeps its part of every
  micro-batch of the one-process update plan (``MicroBatch.share``);
- any other algorithm collects the whole batch on every process; if its loss has no side effects
  (it declares ``spread_micro_batches = True``) each optimiser step's micro-batches are dealt out
  over processes (``spread``), otherwise every process runs all of them (exact, no speed-up);
- each process scales its losses by ``share * N / k`` (``k`` micro-batches in the optimiser
  step), so the data-parallel mean of the gradients is the one-process gradient, and training
  statistics are share-weighted sums reduced over processes (``reduce_stats``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..algorithms._rollout import Shard


def all_gather_cat(t: Tensor, device: torch.device | str | None = None) -> Tensor:
    """``t`` of every process (the same shape everywhere), concatenated along dim 0 in rank order.

    ``device`` is where the collective runs (the accelerator's device: NCCL needs CUDA tensors);
    the result comes back on ``t``'s device and dtype.
    """
    x = t.to(device or t.device)
    if x.dtype == torch.bool:  # not every backend reduces bools
        x = x.to(torch.uint8)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts).to(device=t.device, dtype=t.dtype)


def all_reduce_sum(values: Sequence[float], device: torch.device | str | None = None) -> list[float]:
    """Element-wise sums of ``values`` over processes (float64)."""
    x = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.tolist()


def process_shard(accelerator) -> Shard:
    """This process's ``Shard`` under an accelerate run (the one-process shard without one)."""
    if accelerator.num_processes == 1:
        return Shard()
    return Shard(accelerator.process_index, accelerator.num_processes,
                 gather=partial(all_gather_cat, device=accelerator.device))


def spread(items: list, rank: int, world: int) -> list[tuple[Any, float]]:
    """This process's ``(item, share)`` of a list every process holds: items ``rank``,
    ``rank + world``, ... with share 1, padded with ``(items[0], 0.0)`` so that every process runs
    the same number of backward passes."""
    mine = [(x, 1.0) for x in items[rank::world]]
    return mine + [(items[0], 0.0)] * (-(-len(items) // world) - len(mine))


def own_micro_batches(micro_batches: list, shard: Shard, split: str) -> list[tuple[Any, float]]:
    """``(micro-batch, share)`` this process runs for one optimiser step of ``micro_batches``; the
    count is the same on every process. ``split``: ``"shard"`` (the algorithm kept this process's
    part of each micro-batch, ``micro.share``), ``"spread"`` (every process holds the whole list:
    deal it out) or ``"replicate"`` (every process runs every micro-batch, share ``1 / N``: exact
    for any algorithm, including one whose loss updates state of its own, but no speed-up)."""
    if shard.world == 1:
        return [(m, 1.0) for m in micro_batches]
    if split == "shard":
        return [(m, m.share) for m in micro_batches]
    if split == "spread":
        return spread(micro_batches, shard.rank, shard.world)
    if split == "replicate":
        return [(m, 1.0 / shard.world) for m in micro_batches]
    raise ValueError(f"split must be 'shard', 'spread' or 'replicate', got {split!r}")


def as_floats(values: Sequence[float | Tensor]) -> list[float]:
    """Python floats of a mix of floats and 0-d tensors, with one device read for all the tensors
    (losses return their statistics as tensors so that a micro-batch never waits on the device)."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    if not tensors:
        return [float(v) for v in values]
    read = iter(torch.stack([v.detach().reshape(()).to(tensors[0].device, torch.float64) for v in tensors]).tolist())
    return [next(read) if isinstance(v, Tensor) else float(v) for v in values]


def reduce_stats(stats: dict[str, list[tuple[float | Tensor, float]]], world: int,
                 device: torch.device | str | None = None) -> dict[str, float]:
    """Means of training statistics recorded as ``(value, share)`` per micro-batch (values are
    floats or 0-d tensors). One process: plain means. N processes: share-weighted means over every
    process, so a statistic that is a mean over the samples of a micro-batch comes out as its
    one-process value; the keys are the union over processes, in the main process's order."""
    if world == 1:
        keys = list(stats)
        means = as_floats([sum(v for v, _ in stats[k]) / len(stats[k]) for k in keys])
        return dict(zip(keys, means))
    keys: list[list[str]] = [[] for _ in range(world)]
    dist.all_gather_object(keys, list(stats))
    order = list(dict.fromkeys(k for ks in keys for k in ks))
    own = ([sum(v * w for v, w in stats.get(k, []) if w) for k in order]
           + [sum(w for _, w in stats.get(k, [])) for k in order])
    totals = all_reduce_sum(as_floats(own), device)
    return {k: totals[i] / totals[len(order) + i] if totals[len(order) + i] else float("nan")
            for i, k in enumerate(order)}


def agree(flag: bool, world: int, device: torch.device | str | None = None) -> bool:
    """``True`` on every process if it is ``True`` on any (a decision such as "out of time" must be
    the same everywhere, or the processes fall out of step)."""
    if world == 1:
        return flag
    return all_reduce_sum([float(flag)], device)[0] > 0


def is_main_process() -> bool:
    """Whether this is the main process of a launched run (or no launched run), before accelerate starts."""
    return int(os.environ.get("RANK", "0")) == 0


def launch_command(train_args: list[str], num_processes: int | None,
                   config_file: str | os.PathLike | None = None) -> list[str]:
    """``accelerate launch`` running ``diffalign train <train_args>`` in ``num_processes`` processes
    (``None``: the number the config file sets).

    Without an accelerate config file the processes train data-parallel (DDP; on a machine without
    GPUs accelerate runs them on CPU with the gloo backend); a config file from
    ``configs/accelerate/`` selects FSDP or DeepSpeed.
    """
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    if config_file is not None:
        if not Path(config_file).is_file():
            raise FileNotFoundError(f"accelerate config file not found: {config_file}")
        cmd += ["--config_file", str(config_file)]
    else:
        if num_processes is None:
            raise ValueError("give the number of processes or an accelerate config file that sets it")
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if num_processes > 1:
            cmd.append("--multi_gpu")
    return cmd + ["--module", "diffalign", "train", *train_args]


def launch(train_args: list[str], num_processes: int | None, config_file: str | os.PathLike | None = None) -> int:
    """Run ``launch_command`` and return its exit status. accelerate's launcher (torchrun) watches
    the processes: when one dies, it stops the others and exits non-zero, naming the failed rank."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(launch_command(train_args, num_processes, config_file), env=env).returncode
