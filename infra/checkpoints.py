"""
infra/checkpoints.py -- checkpoints and exact resume.

checkpoint-<step>/ holds the full model in save_pretrained layout (what --model and --eval-only
load), and what a resume needs to continue bit for bit: state/ (the sharded model and optimizer,
torch.distributed.checkpoint), rng-<rank>.pt (every random generator of that rank), trainer.json
(step, data position, scheduler). A checkpoint is complete only when its manifest (every file and
its size, written last) matches what is on disk; --resume takes the newest complete one and says
why it skips the others. Nothing in a folder runs code on --resume: the random state is tensors
and plain data (torch.load weights_only), and DCP's pickled .metadata is read first by a strict
unpickler (README, "What a checkpoint folder is trusted for").
"""
import json
import os
import random
import re

import numpy as np
import torch

from infra import rundir
from infra.distributed import all_max, barrier, get_rank, world_size

def rng_state():
    """Every generator a step draws from, as tensors and plain data only (no numpy or Python
    objects), so that rng-<rank>.pt loads with torch.load(weights_only=True): nothing in it can
    run code when a checkpoint is resumed."""
    version, mt, gauss = random.getstate()                      # (3, 625 ints, float | None)
    name, keys, pos, has_gauss, cached = np.random.get_state()  # MT19937: 624 uint32 keys
    return dict(torch=torch.get_rng_state(), python=[version, list(mt), gauss],
                numpy=dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), cached=float(cached)),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(rng):
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    version, mt, gauss = rng["python"]
    random.setstate((version, tuple(mt), gauss))
    n = rng["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))


class _Refused(Exception):
    """A checkpoint file that could run code when loaded."""


def load_rng(path):
    """rng-<rank>.pt -> the random state, loaded with weights_only=True: a file holding anything
    but tensors and plain data (a pickle that would build objects or run code) is refused."""
    import pickle
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"(?i)unsupported global:? (?:GLOBAL )?([\w.]+)", str(e))
        raise _Refused(f"{path} holds pickled objects, not only tensors and plain data"
                       + (f" (it names {named.group(1)})" if named else ""))


def _dcp_global(module, name):
    """The globals PyTorch's distributed-checkpoint metadata is built of, or None: the dataclasses
    and enums of torch.distributed.checkpoint's metadata and filesystem modules, torch.Size, the
    dtypes, layouts and memory formats, paths. Called with pickled arguments, none runs code."""
    import dataclasses
    import enum
    import importlib
    import pathlib
    if module in ("torch.distributed.checkpoint.metadata",
                  "torch.distributed.checkpoint.filesystem"):
        c = getattr(importlib.import_module(module), name, None)
        ok = isinstance(c, type) and (dataclasses.is_dataclass(c) or issubclass(c, enum.Enum))
        return c if ok else None
    if module == "torch":
        x = getattr(torch, name, None)
        return x if x is torch.Size or isinstance(x, (torch.dtype, torch.layout,
                                                       torch.memory_format)) else None
    plain = {("torch.serialization", "_get_layout"): torch.serialization._get_layout,
             ("pathlib", "PosixPath"): pathlib.PosixPath, ("pathlib", "Path"): pathlib.Path,
             ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
             ("collections", "OrderedDict"): __import__("collections").OrderedDict}
    return plain.get((module, name))


def check_dcp_metadata(path):
    """torch.distributed.checkpoint reads state/.metadata with a plain pickle.load, which runs
    whatever a crafted file names. Read it first with an unpickler that builds only what DCP's
    metadata is made of (_dcp_global) and refuses any other global, so that a folder from
    elsewhere cannot run code on --resume."""
    import pickle

    class Strict(pickle.Unpickler):
        def find_class(self, module, name):
            found = _dcp_global(module, name)
            if found is None:
                raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata "
                                             "never holds")
            return found
    try:
        with open(path, "rb") as f:
            Strict(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise _Refused(f"{path} is not plain DCP metadata ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:160]})")


def _no_space(e):
    """Whether an exception (or one it wraps, as torch.distributed.checkpoint does) is ENOSPC."""
    import errno
    seen = [e]
    while seen:
        x = seen.pop()
        if isinstance(x, OSError) and x.errno == errno.ENOSPC or "No space left" in str(x):
            return True
        seen += [c for c in (x.__cause__, x.__context__) if c is not None]
        seen += [v for v in getattr(x, "failures", {}).values() if isinstance(v, BaseException)]
    return False


def save_checkpoint(policy, processor, opt, sched, stream, step, out_dir, rank, rng=None):
    """checkpoint-<step>/: the full model in save_pretrained layout (gathered to rank 0), and what a
    resume needs: state/ (sharded model + optimizer, torch.distributed.checkpoint), rng-<rank>.pt
    (rng: the random state to resume with, default now), trainer.json, and last manifest.json.
    Written as checkpoint-<step>.tmp and renamed when complete. A failed write (a full disk)
    removes the partial folder and stops the run: the previous checkpoint stays intact."""
    import shutil
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_state_dict)
    final = os.path.join(out_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # the remains of a run killed while saving
        os.makedirs(tmp)
    barrier()
    error = None
    try:  # every rank runs the same collectives, whatever fails where
        model_sd, optim_sd = get_state_dict(policy, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "state"))
        torch.save(rng or rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
    except Exception as e:
        error = e
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(policy.model, options=options)
    if rank == 0 and error is None:
        try:
            policy.model.save_pretrained(tmp, state_dict=full)
            policy.model.shipped_generation_config.save_pretrained(tmp)  # the folder's, not ours
            processor.save_pretrained(tmp)
            trainer = dict(step=step, epoch=stream.epoch, pos=stream.pos, world=world_size(),
                           sched=sched.state_dict())
            rundir.write_atomic(os.path.join(tmp, "trainer.json"), json.dumps(trainer).encode())
        except Exception as e:
            error = e
    if all_max(error is not None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = "no space left on the device" if error is None or _no_space(error) else error
        raise SystemExit(f"error: checkpoint-{step} could not be written ({reason}); the partial "
                         f"folder is removed, earlier checkpoints in {out_dir} are intact")
    barrier()  # every rank's files are on disk
    if rank == 0:
        files = {os.path.relpath(os.path.join(d, f), tmp): os.path.getsize(os.path.join(d, f))
                 for d, _, names in os.walk(tmp) for f in names}
        manifest = json.dumps(files, indent=0).encode()
        rundir.write_atomic(os.path.join(tmp, "manifest.json"), manifest)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()
    return final

def checkpoints(out_dir):
    """-> [(step, path)] of the checkpoint folders in out_dir (complete or not), oldest first."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    found = [re.fullmatch(r"checkpoint-(\d+)", d) for d in names]
    return sorted((int(m.group(1)), os.path.join(out_dir, m.group(0))) for m in found if m)


def incomplete(path):
    """Why a checkpoint folder cannot be resumed from (None: it can): its manifest is missing or a
    file it lists is missing or of another size (a truncated shard, say)."""
    try:
        files = json.load(open(os.path.join(path, "manifest.json")))
    except (OSError, ValueError):
        return "no manifest (written last: the save did not finish)"
    for name, size in sorted(files.items()):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        if os.path.getsize(full) != size:
            return f"{name} has {os.path.getsize(full)} bytes, not {size}"
    for need in ("trainer.json", os.path.join("state", ".metadata"), f"rng-{get_rank()}.pt"):
        if need not in files:
            return f"{need} is missing"
    return None

def load_checkpoint(policy, opt, sched, stream, path, rank):
    """Restore everything save_checkpoint wrote; returns the step to continue after."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    with open(os.path.join(path, "trainer.json")) as f:
        t = json.load(f)
    if t.get("world", 1) != world_size():
        raise SystemExit(f"error: {path} was written by {t['world']} ranks; resume it with as many "
                         f"(this run has {world_size()}): each rank's random stream is its own")
    try:  # the two pickles of a checkpoint, checked before anything loads them (README)
        check_dcp_metadata(os.path.join(path, "state", ".metadata"))
        rng, refused = load_rng(os.path.join(path, f"rng-{rank}.pt")), None
    except _Refused as e:
        refused = str(e)
    if all_max(refused is not None):  # every rank stops, before any collective of the load
        raise SystemExit(f"error: --resume refuses {path}: {refused or 'another rank refused it'}; "
                         "loading it could run code. Resume only from folders calibrl wrote")
    model_sd, optim_sd = get_state_dict(policy, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(path, "state"))
    set_state_dict(policy, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    stream.epoch, stream.pos = t["epoch"], t["pos"]
    sched.load_state_dict(t["sched"])
    set_rng_state(rng)
    return t["step"]


def resume(policy, opt, sched, stream, out_dir, logger, args, rank, say):
    """--resume: restore the newest complete checkpoint, saying which newer ones are skipped and
    why; -> the step to continue after (0: none, the run starts afresh and its old rows go)."""
    if not args.resume:
        return 0
    start = 0
    for step, path in reversed(checkpoints(out_dir)):
        why = incomplete(path)
        if all_max(why is not None):  # every rank must agree on the one it takes
            say(f"warning: skipping {path}: {why or 'incomplete on another rank'}")
            continue
        start = load_checkpoint(policy, opt, sched, stream, path, rank)
        say(f"resuming from {path} (step {start})")
        break
    else:
        say(f"note: --resume: no complete checkpoint in {out_dir}; starting from step 0")
    logger.truncate(start, say)
    return start


def step_start(stream):
    """What resuming at the start of a step needs beyond the weights: the random state and the
    data position as they are now."""
    return rng_state(), stream.epoch, stream.pos


def save_before(step, at_start, policy, processor, opt, sched, stream, out_dir):
    """A step abandoned on a stop request (its weights never moved): checkpoint-<step - 1> with the
    random state and the data position of the step's start, so --resume replays the step exactly.
    An identical complete checkpoint from the end of the last step is kept as it is."""
    path = os.path.join(out_dir, f"checkpoint-{step - 1}")
    if not all_max(incomplete(path) is not None):
        return path
    stream.epoch, stream.pos = at_start[1:]
    return save_checkpoint(policy, processor, opt, sched, stream, step - 1, out_dir, get_rank(),
                           rng=at_start[0])


def check_weights(policy, step, out_dir):
    """A step that left a non-finite weight (an optimizer step blown up by an infinite learning
    rate, say) stops the run at once, unsaved: the newest checkpoint holds the last good weights."""
    bad = any(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
              for p in policy.parameters())
    if all_max(bad):
        raise SystemExit(f"error: step {step} left non-finite weights; they are not saved (the "
                         f"newest checkpoint in {out_dir} holds the last good ones)")
