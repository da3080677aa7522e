"""
infra/distributed.py -- torchrun and FSDP2: ranks, devices, collectives, sharding.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; `python calibrl.py` is rank 0 of 1 and every
collective here is then the identity. Apart because every other room may need a collective and
none should know how the process group was made. The one idiom for keeping ranks in step is
in_step: FSDP2's collectives must pair up, so every rank runs as many forwards.
"""
import contextlib
import os

import torch

from infra import family


def setup_distributed(timeout=600.0):
    """-> rank, world, device; under torchrun (even with one process) a process group for FSDP2,
    whose collectives give up after `timeout` seconds (--dist-timeout) instead of torch's 30
    minutes, so a rank waiting on a frozen peer stops (rundir.run turns that into one line)."""
    import warnings
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP, one process
    rank, world, local = (int(os.environ.get(k, d)) for k, d in
                          (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if torch.cuda.is_available() and local >= torch.cuda.device_count():
        raise SystemExit(f"error: local rank {local} has no GPU ({torch.cuda.device_count()} "
                         "visible): start at most one process per GPU, or hide the GPUs "
                         "(CUDA_VISIBLE_DEVICES=) to run on CPUs")
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        import datetime
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(seconds=timeout))
    return rank, world, device


CLOSERS = []  # run before the process group closes: a vLLM engine's own groups live inside it


def close():
    """The end of a run: what registered in CLOSERS (newest first), then the process group."""
    while CLOSERS:
        CLOSERS.pop()()
    if active():
        torch.distributed.destroy_process_group()


def active():
    """Whether calibrl runs under torchrun with its process group. Not merely is_initialized(): in
    a plain process vLLM makes a group of one for itself (--rollout vllm), which is not a run of
    ranks (no FSDP2, no blank images, no agreement to reach)."""
    return "RANK" in os.environ and torch.distributed.is_initialized()


def _on_backend(x):
    """x as a float64 tensor (a copy) where the process group can reduce it: NCCL reduces only
    CUDA tensors, gloo CPU ones."""
    nccl = active() and torch.distributed.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return torch.as_tensor(x).to(dev, torch.float64, copy=True)


def get_rank():
    return torch.distributed.get_rank() if active() else 0


def world_size():
    return torch.distributed.get_world_size() if active() else 1


def all_sum(x):
    """Sum a float or tensor over ranks (identity on one process) -> a float, or a CPU tensor."""
    t = _on_backend(x)
    if active():
        torch.distributed.all_reduce(t)
    return t.cpu() if torch.is_tensor(x) else t.item()


def all_max(x):
    """The largest float (or tensor, elementwise) over ranks -> a float, or a CPU tensor."""
    t = _on_backend(x)
    if active():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.cpu() if torch.is_tensor(x) else t.item()


def barrier():
    if active():
        torch.distributed.barrier()


def in_step(work):
    """The one idiom for keeping ranks in step: FSDP's collectives (and synced generation) must pair
    up, so every rank runs as many forwards. `work` is this rank's list of items; it comes back
    padded with None up to the longest list of any rank. A None is dummy work: run it on a stand-in
    item with weight 0 and keep nothing from it."""
    return work + [None] * (int(all_max(len(work))) - len(work))


def shard(policy, compute_dtype, device):
    """FSDP2: each decoder layer and vision block, the vision tower, then the root; bf16 compute
    with fp32 gradient reduction on GPUs (the parameters stay fp32 master weights)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = (MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
          if device.type == "cuda" else MixedPrecisionPolicy())
    blocks = set(getattr(policy.model, "_no_split_modules", None) or [])
    fam = family.of(policy.model)
    for name, m in reversed(list(policy.model.named_modules())):  # children before their parents
        # the vision tower is a unit of its own, so that generate can run its patch embedding
        if type(m).__name__ in blocks or fam.is_vision_tower(name):
            fully_shard(m, mp_policy=mp)
    fully_shard(policy, mp_policy=mp)


@contextlib.contextmanager
def gathered(policy, whole=True):
    """Rollout under FSDP2: all-gather the weights once and keep them whole while decoding, instead
    of one all-gather per layer per decoded token; reshard after. Nothing to do on one process, nor
    with whole=False (--rollout vllm: vLLM holds its own copy, synced one parameter at a time)."""
    if not active() or not whole:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def clip_grad_norm(model, max_norm):
    """The gradient norm over every rank's shards, clipped to max_norm -> the norm before."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def peak_memory_gb(device):
    """The CUDA allocator's peak since the last reset (each rollout, each step's perf_metrics), else
    this process's peak resident set size (which only grows; Linux reports KiB)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
