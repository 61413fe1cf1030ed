"""One ``accelerate.Accelerator`` per training run, whatever ran before it in the process.

accelerate keeps mixed precision and the CPU flag in a process-wide singleton and refuses a
second ``Accelerator`` with other settings ("AcceleratorState has already been initialized"):
a notebook or a test session that trains a generator (fp32) and then a tokenizer (bf16 on a GPU)
hit exactly that. Each run discards the previous run's settings, its device included (a CPU run
followed by a GPU run would otherwise stay on the CPU). A ``torch.distributed`` process group
that is already up is reused: accelerate only creates one when none is initialized, so runs
under ``torchrun`` are unaffected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

    from softvq.training.config import TrainConfig

T = TypeVar("T")


def check_processes_fit_gpus(cpu: bool) -> None:
    """Several processes on one GPU make NCCL fail deep inside DDP ("Duplicate GPU detected");
    say what to launch instead."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not cpu and gpus and processes > gpus:
        raise ValueError(
            f"{processes} processes on this machine but {gpus} visible GPU(s): launch one process per GPU "
            f"(torchrun --nproc_per_node {gpus}), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on "
            f"CPU processes with gloo")


def new_accelerator(**kwargs: Any) -> Accelerator:
    """``Accelerator(**kwargs)`` for a new run (see the module docstring)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    check_processes_fit_gpus(bool(kwargs.get("cpu", False)))
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(**kwargs)


def launched_worker() -> bool:
    """True in one of several processes started by torchrun or ``accelerate launch``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def first_launched_process() -> bool:
    """Whether this is process 0 of a ``torchrun`` / ``accelerate launch`` run (or not launched):
    the one that speaks for all, before or without an ``Accelerator``. A ``RANK`` without a launch
    (``WORLD_SIZE`` 1 or unset: a job scheduler's variable) does not make a process a follower."""
    return not launched_worker() or os.environ.get("RANK", "0") == "0"


def first_process_on_its_machine() -> bool:
    """Whether this is the first process of a launched run on its machine (``LOCAL_RANK`` 0), or not
    launched: what it met before the processes talk (its machine's files) it may have met alone."""
    return not launched_worker() or os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0"


def launched_accelerator(cpu: bool) -> Accelerator | None:
    """An ``Accelerator`` when ``torchrun`` / ``accelerate launch`` started several processes, else None
    (a command run alone keeps its own device choice and no process group)."""
    if not launched_worker():
        return None
    return new_accelerator(cpu=cpu)


def gather_objects(obj: Any, world: int) -> list[Any]:
    """``obj`` of every process, in rank order (every process must call this)."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def same_on_every_process(settings: dict[str, Any], world: int, ignore: tuple[str, ...] = ()) -> None:
    """Refuse, on every process, a launch whose processes were given different ``settings``
    (collective: every process calls it). torchrun gives each process one command line, but a
    hand-made or multi-node launch may not: its processes would mix their work (another seed per
    process), or wait forever at a collective (another step count). ``ignore``: dotted keys each
    process may set for itself (its data-loading workers, say)."""
    if world == 1:
        return
    from softvq.resume import changed_settings

    # as JSON, so that a tuple and a list of the same values agree; then without the process's own keys
    plain = json.loads(json.dumps(settings, default=str))
    for key in ignore:
        *path, last = key.split(".")
        inner = plain
        for part in path:
            inner = inner.get(part) if isinstance(inner, dict) else None
        if isinstance(inner, dict):
            inner.pop(last, None)
    seen = gather_objects(plain, world)
    for rank, theirs in enumerate(seen[1:], start=1):
        changed = changed_settings(seen[0], theirs)
        if changed:  # found by every process alike: said once
            raise said_by_main_process(ValueError(
                f"the {world} processes of this launch were given different settings (process 0 -> process {rank}: "
                f"{'; '.join(changed)}); start every process with the same command line and files"),
                torch.distributed.get_rank() == 0)


def mean_over_processes(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """Logged scalars averaged over the ``world`` processes, so that a log shows the global batch
    (collective: every process calls it, with the same keys)."""
    if world == 1 or not values:
        return dict(values)
    keys = sorted(values)
    summed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(summed)
    return {k: float(v) / world for k, v in zip(keys, summed.tolist())}


def decided_by_main_process(accelerator, decide: Callable[[], T]) -> T:
    """``decide()`` run on the main process alone, its result given to every process.

    For checks that read or claim an output folder: run by every process they would race with
    each other's writes. A refusal (``OSError`` or ``ValueError``) is raised on every process, so
    none is left waiting for the others at a later collective call.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    verdict: tuple[str, Any] = ("ok", None)
    if accelerator.is_main_process:
        try:
            verdict = ("ok", decide())
        except (OSError, ValueError) as exc:
            verdict = ("refused", exc)
    kind, value = broadcast_object_list([verdict])[0]
    if kind == "refused":
        raise said_by_main_process(value, accelerator.is_main_process)
    return value


def said_by_main_process(error: BaseException, is_main: bool) -> BaseException:
    """``error`` marked, on every process but the main one, as one the main process says: a
    refusal every process raises (none may wait at a later collective) is printed once by the CLI
    (:func:`said_elsewhere`)."""
    if not is_main:
        error.shown_by_main_process = True  # type: ignore[attr-defined]
    return error


def said_elsewhere(error: BaseException) -> bool:
    """Whether the main process prints ``error`` (see :func:`said_by_main_process`)."""
    return getattr(error, "shown_by_main_process", False)


def make_accelerator(cfg: TrainConfig) -> "Accelerator":
    """An ``accelerate.Accelerator``: bf16 autocast on GPU (``schedule.precision=auto``), fp32 on CPU;
    DDP when launched with several processes, or FSDP (full sharding) when asked."""
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    precision = cfg.schedule.precision
    mixed = "bf16" if precision == "bf16" or (precision == "auto" and cuda) else "no"
    kwargs: dict[str, Any] = {"kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=False)]}
    if cfg.run.distributed == "fsdp":
        if not cuda:
            raise ValueError("run.distributed=fsdp needs CUDA GPUs; use run.distributed=ddp on CPU")
        from accelerate import FullyShardedDataParallelPlugin

        # Each ViT block is its own FSDP unit, so only one block's full weights exist at a time.
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            sharding_strategy="FULL_SHARD", use_orig_params=True, sync_module_states=True,
            state_dict_type="FULL_STATE_DICT", auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["Block"],
        )
    return new_accelerator(mixed_precision=mixed, cpu=not cuda, **kwargs)
