"""
infra.py -- the machinery beside calibrl.py that is not the algorithm.

calibrl.py reads as the paper: prompts, reward, rollout, log-probs, Eq. A-C, the update, the loop.
What a reader learning CalibRL never needs to open, and an engineer chasing a crash at scale looks
for first, lives here, in the order a run meets it:

  torchrun and FSDP2   setup_distributed, all_sum / all_max / barrier, in_step (the one idiom for
                       dummy work that keeps ranks in step), shard, gathered
  model files          load_processor (Qwen2-VL processors without torchvision), fused_ops (the
                       Triton kernel file, loaded by path)
  data                 read_examples: every row checked before the first step, one report naming
                       the file, each bad row and field; PromptStream: the data order
  the answer checker   Verifier: math-verify in a worker process that can be killed
  metrics              add, reduce_stats, Logger (one line per step, metrics.jsonl, TensorBoard)
  checkpoints          save_checkpoint, checkpoints, load_checkpoint: exact resume
  packed micro-batches packed_micro_batches (the token-budget plan), pack_rows -> Pack,
                       enable_packed_attention, packed_hidden (one vision forward per prompt),
                       count_forward / perf_metrics (perf/pad_frac, perf/vision_encodes,
                       mem/peak_gb)

It imports nothing from calibrl.py: calibrl passes in what the machinery needs (its prompt
builder, its answer check), so there is no import circle.
"""
import contextlib
import io
import json
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# torchrun and FSDP2: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; `python calibrl.py` is rank 0.

def setup_distributed():
    """-> rank, world, device; under torchrun (even with one process) a process group for FSDP2."""
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
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def distributed():
    return torch.distributed.is_initialized()


def all_sum(x):
    """Sum a float or tensor over ranks (identity on one process)."""
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    if distributed():
        torch.distributed.all_reduce(t)
    return t if torch.is_tensor(x) else t.item()


def all_max(x):
    t = torch.tensor(float(x), dtype=torch.float64)
    if distributed():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def barrier():
    if distributed():
        torch.distributed.barrier()


def check_args(args, world):
    """User errors in the flags, each a clear message before the model loads."""
    if args.prompts_per_step % world or args.mini_batch_prompts % world:
        raise SystemExit(f"error: --prompts-per-step ({args.prompts_per_step}) and "
                         f"--mini-batch-prompts ({args.mini_batch_prompts}) must be multiples of "
                         f"the number of ranks ({world})")
    check_budget(args)


def compute_dtype(name, device):
    """--dtype: auto is bf16 on a GPU, fp32 on a CPU."""
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"auto": auto, "float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def use_fused(flag, device):
    """--fused: auto is on with CUDA (on a CPU the kernels run in Triton's slow interpreter)."""
    return device.type == "cuda" if flag == "auto" else flag == "on"


def demo_defaults(args, demo_model, demo_train, demo_val, say):
    """Without --model: the bundled tiny model (built by data/make_demo.py when missing); without
    --data: the bundled demo data and its validation split. -> the model path."""
    if args.model is None and not os.path.exists(demo_model):
        import subprocess
        say("building the demo model and data (data/make_demo.py) ...")
        subprocess.run([sys.executable, os.path.join(HERE, "data", "make_demo.py")], check=True)
    if args.data is None:
        args.data, args.eval_data = demo_train, args.eval_data or demo_val
        if args.model:
            say(f"notice: no --data given; training {args.model} on the bundled demo data")
    return args.model or demo_model


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
    for name, m in reversed(list(policy.model.named_modules())):  # children before their parents
        # the vision tower is a unit of its own, so that generate can run its patch embedding
        if type(m).__name__ in blocks or name.endswith("visual"):
            fully_shard(m, mp_policy=mp)
    fully_shard(policy, mp_policy=mp)


@contextlib.contextmanager
def gathered(policy):
    """Rollout under FSDP2: all-gather the weights once and keep them whole while decoding, instead
    of one all-gather per layer per decoded token; reshard after. Nothing to do on one process."""
    if not distributed():
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


def micro_batches(items, size):
    """Chunks of `size` items, padded with None (dummy work) so every rank runs as many forwards."""
    return in_step([items[i:i + size] for i in range(0, len(items), size)])


def pad_rows(vectors, T):
    """[(T_i,) tensors] -> (len, T), zero past each vector's end."""
    out = torch.zeros(len(vectors), T, dtype=vectors[0].dtype)
    for i, v in enumerate(vectors):
        out[i, :min(len(v), T)] = v[:T]
    return out


def clip_grad_norm(model, max_norm):
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

# -----------------------------------------------------------------------------
# Model files

def load_processor(path, config):
    """The processor of a model folder; the tokenizer alone for a text-only LM."""
    import transformers
    from transformers import AutoProcessor, AutoTokenizer
    if not hasattr(config, "vision_config"):
        return AutoTokenizer.from_pretrained(path)
    try:
        proc = AutoProcessor.from_pretrained(path)
        if hasattr(proc, "image_processor"):
            return proc
    except (ImportError, ValueError, OSError, AttributeError):
        pass
    # Without torchvision, Qwen2-VL-family processors fail on their video processor. The same class
    # with an __init__ that takes no video processor handles images identically; it keeps the base
    # class's name, so its saved processor_config.json loads as the real one with torchvision.
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    base = getattr(transformers, PROCESSOR_MAPPING_NAMES[config.model_type])

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kw):
        base.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kw)
    return type(base.__name__, (base,), {"__init__": __init__}).from_pretrained(path)


def fused_ops():
    """kernels/fused_calibrl.py, loaded by its path under a name of its own. kernels/ is no package
    on purpose: an installed distribution named `kernels` (Hugging Face's, which transformers
    imports when present) must neither be shadowed by this folder nor shadow it."""
    name = "calibrl_fused_kernels"
    if name not in sys.modules:
        import importlib.util
        path = os.path.join(HERE, "kernels", "fused_calibrl.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: importable by name while it runs
        spec.loader.exec_module(module)
    return sys.modules[name]

# -----------------------------------------------------------------------------
# Data: .parquet or .jsonl rows -> examples {messages, images, answer, solution}, checked up front.

class BadRow(Exception):
    """A row problem: (field, reason)."""


def read_rows(path):
    """-> [(row number from 1, in file order; row dict or BadRow)]; a bad file ends the run."""
    where = f"data file {path}"
    if not os.path.isfile(path):
        raise SystemExit(f"error: {where}: not found")
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq
            rows = list(enumerate(pq.read_table(path).to_pylist(), 1))
        else:
            rows = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        bad = BadRow("json", f"invalid JSON ({e.msg} at column {e.colno})")
                        rows.append((n, bad))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SystemExit(f"error: {where}: unreadable ({type(e).__name__}: {e})")
    if not rows:
        raise SystemExit(f"error: {where}: no rows")
    return rows


def to_parts(text):
    """'<image>What is x?' -> [{'type': 'image'}, {'type': 'text', 'text': 'What is x?'}]"""
    parts = []
    for i, piece in enumerate(text.split("<image>")):
        if i > 0:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


def parse_row(row, args, base_dir):
    """A row of the schema (README) -> {messages, images, answer, solution}; raises BadRow.
    messages are chat messages whose content is a list of parts, one {'type': 'image'} per image."""
    if not isinstance(row, dict):
        raise BadRow("row", "not a JSON object")
    prompt, images = row.get("prompt"), row.get("images")
    if images is None:
        images = []
    if not isinstance(images, (list, tuple)):
        raise BadRow("images", f"not a list ({type(images).__name__})")
    if not prompt:
        raise BadRow("prompt", "missing or empty")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    chat = isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt)
    if not chat:
        raise BadRow("prompt", "neither a string nor a list of chat messages {role, content}")
    parts = lambda c: to_parts(c) if isinstance(c, str) else list(c)
    messages = [{"role": m.get("role", "user"), "content": parts(m["content"])} for m in prompt]
    placeholders = sum(p.get("type") == "image" for m in messages for p in m["content"])
    if placeholders and placeholders != len(images):
        raise BadRow("prompt", f"{placeholders} <image> placeholders for {len(images)} images")
    if images and not placeholders:  # images without placeholders go before the first user text
        user = next(m for m in messages if m["role"] == "user")
        user["content"] = [{"type": "image"} for _ in images] + user["content"]
    refs = []
    for k, im in enumerate(images):
        if isinstance(im, dict) and im.get("bytes") is not None:
            refs.append({"bytes": im["bytes"]})
        elif isinstance(im, (str, dict)) and (im if isinstance(im, str) else im.get("path")):
            refs.append({"path": os.path.join(base_dir, im if isinstance(im, str) else im["path"])})
        else:
            raise BadRow(f"images[{k}]", "neither a path nor a {bytes} / {path} dict")
    key = args.answer_key
    answer = row.get(key)
    if key is None:  # verl's field wins over `answer`: the official reward reads only it
        verl = row.get("reward_model")
        answer = verl.get("ground_truth") if isinstance(verl, dict) else None
        key = "reward_model.ground_truth"
        if answer is None:
            answer, key = row.get("answer"), "answer"
    usable = isinstance(answer, (str, int, float)) and not isinstance(answer, bool)
    if not usable or not str(answer).strip():
        raise BadRow(key, "missing or empty (neither reward_model.ground_truth nor answer)")
    solution = row.get(args.solution_key)
    if isinstance(solution, (list, tuple)):
        solution = solution[0] if solution else None
    if isinstance(solution, dict):
        solution = solution.get("content")
    if solution is not None and not isinstance(solution, str):
        raise BadRow(args.solution_key, f"neither a string, a list nor a message "
                                        f"({type(solution).__name__})")
    if isinstance(row.get("pass_ratio"), (int, float)) and row["pass_ratio"] <= 0:
        solution = None  # the official data format: no expert for this row
    return dict(messages=messages, images=refs, answer=str(answer), solution=solution or None)


def open_image(ref):
    from PIL import Image
    im = Image.open(io.BytesIO(ref["bytes"]) if ref.get("bytes") is not None else ref["path"])
    return im.convert("RGB")


def read_examples(path, args, tok, is_vlm, prepare, say=print, train=True):
    """Read and check every row before the first step. prepare(example) finishes the prompt (the
    caller's prompt builder) and returns its length in tokens. With bad rows: one message naming the
    file, each row and field, then exit 1 (nothing has run yet); with --skip-bad-rows, the rest.
    The expert's rules (a solution under LUFFY / RL-PLUS, its length) apply to training rows
    only."""
    base, good, bad, no_expert = os.path.dirname(os.path.abspath(path)), [], [], 0
    for n, row in read_rows(path):
        try:
            if isinstance(row, BadRow):
                raise row
            if not train and isinstance(row, dict):  # validation rows have no expert
                row = {**row, args.solution_key: None}
            ex = parse_row(row, args, base)
            if ex["images"] and not is_vlm:
                raise BadRow("images", "the model is text-only and takes no images")
            for k, ref in enumerate(ex["images"]):
                try:
                    open_image(ref)
                except Exception as e:
                    why = f"cannot be read as an image ({type(e).__name__}: {e})"
                    raise BadRow(f"images[{k}]", why[:200])
            n_prompt = prepare(ex)
            if n_prompt > args.max_prompt_length:
                raise BadRow("prompt", f"{n_prompt} tokens > --max-prompt-length "
                                       f"{args.max_prompt_length}")
            if train and ex["solution"] is None and args.algo in ("luffy", "rlplus"):
                raise BadRow(args.solution_key, f"missing: --algo {args.algo} needs an expert "
                                                "solution")
            if ex["solution"] is not None:
                ids = tok(ex["solution"], add_special_tokens=False)["input_ids"]
                if len(ids) + 1 > args.max_response_length:  # + the end-of-turn token
                    limit = args.max_response_length
                    raise BadRow(args.solution_key, f"{len(ids) + 1} tokens > "
                                                    f"--max-response-length {limit}")
            no_expert += ex["solution"] is None
            good.append(ex)
        except BadRow as e:
            bad.append(f"row {n}, field '{e.args[0]}': {e.args[1]}")
    if bad and not args.skip_bad_rows:
        more = f"\n  ... and {len(bad) - 20} more bad rows" if len(bad) > 20 else ""
        raise SystemExit(f"error: data file {path} has {len(bad)} bad rows (fix them, or pass "
                         "--skip-bad-rows to train on the rest):\n  " + "\n  ".join(bad[:20])
                         + more)
    if bad:
        say(f"warning: {path}: skipped {len(bad)} bad rows of {len(bad) + len(good)}:\n  "
            + "\n  ".join(bad[:20]))
    if not good:
        raise SystemExit(f"error: data file {path}: no usable rows")
    if train and no_expert and args.algo == "calibrl":  # spec decision 3: l^E = 0 for these prompts
        say(f"warning: {path}: {no_expert} of {len(good)} rows have no expert solution "
            "(l^E = 0 for them)")
    return good


class PromptStream:
    """Epochs over the data, reshuffled with the seed each epoch or in file order (shuffle=False,
    the official run). A step never spans two epochs: an epoch's last partial batch is dropped,
    like verl's drop_last, so one epoch is n // k steps. State: (epoch, pos)."""
    def __init__(self, n, seed, shuffle=True):
        self.n, self.seed, self.shuffle, self.epoch, self.pos = n, seed, shuffle, 0, 0

    def take(self, k):
        if self.pos + k > self.n:  # what is left of this epoch is short of a step
            self.epoch, self.pos = self.epoch + 1, 0
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        self.pos += k
        return order[self.pos - k:self.pos].tolist()

# -----------------------------------------------------------------------------
# The answer checker's sandbox: math-verify can hang inside C code (sympy on a huge exponent, deep
# nesting), where no Python timeout reaches it. It runs in a worker process that can be killed.

def _verify_worker(check, conn, parent_end):
    import logging
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # warns that its timeouts are off
    parent_end.close()  # so that recv() ends (EOFError) when the trainer exits
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the trainer's handlers: terminate() works,
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # and Ctrl-C is the trainer's to handle
    while True:
        pred, gt = conn.recv()
        try:
            conn.send((check(pred, gt), 0))
        except Exception:
            conn.send((0.0, 1))


class Verifier:
    """check(pred, gt) in a worker process, bounded by `timeout` seconds: a check that times out or
    raises scores 0 and is counted in `failures`; a killed worker is restarted on the next call."""
    def __init__(self, check, timeout=5.0):
        self.check, self.timeout, self.proc, self.failures = check, timeout, None, 0

    def __call__(self, pred, gt):
        import multiprocessing as mp
        if self.proc is None:
            ctx = mp.get_context("fork")  # the child only runs sympy: no torch, no CUDA
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_verify_worker, args=(self.check, child, self.conn),
                                    daemon=True)
            self.proc.start()
            child.close()
        self.conn.send((pred, gt))
        if self.conn.poll(self.timeout):
            value, failed = self.conn.recv()
            self.failures += failed
            return value
        self.proc.kill()
        self.proc.join()
        self.proc, self.failures = None, self.failures + 1
        return 0.0

# -----------------------------------------------------------------------------
# Metrics: one line per step on stdout, metrics.jsonl always, TensorBoard on request.

def add(stats, key, value, n=1):
    """stats[key] = [sum of value * n, sum of n]: a weighted mean, reduced over ranks at log."""
    s = stats.setdefault(key, [0.0, 0.0])
    s[0], s[1] = s[0] + value * n, s[1] + n


def reduce_stats(stats):
    """[sum, n] per key, summed over ranks -> {key: mean}; keys with no data anywhere are dropped.
    Every rank must hold the same keys (register them with n = 0 where a rank has no data)."""
    keys = sorted(stats)
    t = all_sum(torch.tensor([v for k in keys for v in stats[k]], dtype=torch.float64)).view(-1, 2)
    return {k: s / n for k, (s, n) in zip(keys, t.tolist()) if n}


def step_metrics(stats, groups):
    """The step's stats plus the train/* means over the on-policy rows (and the expert rows'
    accuracy), reduced over ranks."""
    add(stats, "train/expert_accuracy", 0.0, 0)  # a rank without expert rows still has the key
    for g in groups:
        for r in g.rows:
            add(stats, "train/reward", r.reward)
            add(stats, "train/accuracy", r.acc)
            add(stats, "train/format", r.fmt)
            add(stats, "train/response_length", len(r.resp))
            add(stats, "train/entropy", r.entropy.mean().item(), len(r.resp))
            add(stats, "train/zero_adv_rows", float(r.adv == 0.0))
        if g.expert:
            add(stats, "train/expert_accuracy", g.expert.acc)
    return reduce_stats(stats)


class StopRequest:
    """SIGTERM / SIGINT set a flag instead of killing the run; agreed() asks every rank."""
    def __init__(self):
        self.flag = []
        self.handlers = {sig: signal.signal(sig, lambda *_: self.flag.append(1))
                         for sig in (signal.SIGTERM, signal.SIGINT)}

    def agreed(self):
        return all_max(len(self.flag)) > 0

    def restore(self):
        for sig, h in self.handlers.items():
            signal.signal(sig, h)


class Logger:
    def __init__(self, out_dir, rank, tensorboard, steps):
        self.rank, self.steps, self.t0, self.tb = rank, steps, None, None
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if rank == 0 and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit("error: --tensorboard needs the tensorboard package "
                                 "(pip install tensorboard)")
            self.tb = SummaryWriter(out_dir)

    def truncate(self, step):
        """On resume: drop rows logged after the checkpoint (a run killed mid-way logged them)."""
        if self.rank == 0 and os.path.exists(self.path):
            rows = [line for line in open(self.path) if json.loads(line)["step"] <= step]
            open(self.path, "w").writelines(rows)

    def log(self, step, metrics):
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        m = metrics
        if "train/reward" in m:
            self.t0 = self.t0 or (time.time() - m["time/step"], step - 1)  # for the ETA
            eta = (time.time() - self.t0[0]) / (step - self.t0[1]) * (self.steps - step)
            print(f"step {step}/{self.steps} eta {eta / 60:.1f}m | reward {m['train/reward']:.3f} "
                  f"acc {m['train/accuracy']:.3f} fmt {m['train/format']:.2f} | "
                  f"ent {m['train/entropy']:.3f} clip {m.get('loss/clipfrac', 0):.3f} "
                  f"guided {m.get('loss/guided', 0):.4f} | len {m['train/response_length']:.1f} | "
                  f"t {m['time/rollout']:.1f}/{m['time/logprob']:.1f}/{m['time/update']:.1f}s "
                  f"{m['perf/tokens_per_sec']:.0f} tok/s", flush=True)
        if "eval/accuracy" in m:
            print(f"eval {step:4d} | " + " ".join(f"{k[5:]} {m[k]:.3f}" for k in sorted(m)
                                                  if k.startswith("eval/")), flush=True)

# -----------------------------------------------------------------------------
# Checkpoints and exact resume

def rng_state():
    return dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def save_checkpoint(policy, processor, opt, sched, stream, step, out_dir, rank):
    """checkpoint-<step>/: the full model in save_pretrained layout (gathered to rank 0) and what a
    resume needs: state/ (sharded model + optimizer, torch.distributed.checkpoint), rng-<rank>.pt,
    trainer.json. Written as checkpoint-<step>.tmp and renamed only when complete."""
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
    model_sd, optim_sd = get_state_dict(policy, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "state"))
    torch.save(rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(policy.model, options=options)
    if rank == 0:
        policy.model.save_pretrained(tmp, state_dict=full)
        policy.model.shipped_generation_config.save_pretrained(tmp)  # the folder's, not ours
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump(dict(step=step, epoch=stream.epoch, pos=stream.pos,
                           sched=sched.state_dict()), f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()
    return final


def checkpoints(out_dir):
    """-> [(step, path)] of the complete checkpoints in out_dir, oldest first."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    found = [re.fullmatch(r"checkpoint-(\d+)", d) for d in names]
    return sorted((int(m.group(1)), os.path.join(out_dir, m.group(0))) for m in found if m)


def load_checkpoint(policy, opt, sched, stream, path, rank):
    """Restore everything save_checkpoint wrote; returns the step to continue after."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(policy, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(path, "state"))
    set_state_dict(policy, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(os.path.join(path, "trainer.json")) as f:
        t = json.load(f)
    stream.epoch, stream.pos = t["epoch"], t["pos"]
    sched.load_state_dict(t["sched"])
    rng = torch.load(os.path.join(path, f"rng-{rank}.pt"), weights_only=False)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    return t["step"]


def resume(policy, opt, sched, stream, out_dir, logger, args, rank, say):
    """--resume: restore the newest complete checkpoint; -> the step to continue after (0: none)."""
    if not (args.resume and checkpoints(out_dir)):
        return 0
    path = checkpoints(out_dir)[-1][1]
    start = load_checkpoint(policy, opt, sched, stream, path, rank)
    logger.truncate(start)
    say(f"resuming from {path} (step {start})")
    return start


def prepare_output_dir(args, rank):
    """--output-dir, default runs/<algo>-<timestamp>; every rank uses rank 0's. A folder holding
    another run's checkpoints is refused unless --resume or --overwrite (which clears it)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = args.output_dir or os.path.join("runs", f"{args.algo}-{stamp}")
    if distributed():
        box = [out_dir]
        torch.distributed.broadcast_object_list(box)
        out_dir = box[0]
    if checkpoints(out_dir) and not (args.resume or args.overwrite or args.eval_only):
        raise SystemExit(f"error: {out_dir} holds checkpoints of another run; pass --resume to "
                         "continue it or --overwrite to start afresh")
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        if args.overwrite and not args.resume:
            import shutil
            for _, d in checkpoints(out_dir):
                shutil.rmtree(d)
            open(os.path.join(out_dir, "metrics.jsonl"), "w").close()
    barrier()
    return out_dir

# -----------------------------------------------------------------------------
# Packed micro-batches (issue 12): the pi_old pass and the update without padding, and each
# prompt's images encoded once per micro-batch, not once per row.
#
# The padded path (calibrl.collate) left-pads prompts and right-pads responses to the longest row
# of a micro-batch (~43% of the positions at the paper preset are padding), builds a dense
# (R, 1, S, S) mask and encodes a prompt's images for each of its G + 1 rows. Packed, the rows of a
# micro-batch lie end to end in ONE sequence of S = sum_i (L_i + T_i) tokens; each row attends only
# to itself and keeps the position ids of its unpadded row; the rows of one prompt share one
# vision-tower forward. The pieces, in the order a pass uses them:
#   plan_micro_batches / packed_micro_batches   rows -> micro-batches of at most max_tokens tokens
#   pack_rows -> Pack                           a micro-batch -> packed ids, positions, indices
#   enable_packed_attention / packed_sdpa       the decoder's attention, once, at load time
#   packed_hidden                               one vision pass, one decoder pass -> (N, H)
#   count_forward, perf_metrics, peak_memory_gb perf/pad_frac, perf/vision_encodes, mem/peak_gb
# Shapes: R rows, row i = prompt (L_i) + response (T_i), S = sum_i (L_i + T_i) packed positions,
# N = sum_i T_i response tokens, F image features of the micro-batch's distinct prompts, K image
# tokens over all rows (K >= F when rows share a prompt). Row i starts at packed offset o_i; the
# hidden state at o_i + L_i - 1 + t predicts response token t at o_i + L_i + t (logits at p predict
# the token at p + 1, as in the padded path, where positions [L-1, L+T-1) score the response).
#
# transformers facts this relies on (5.17 and 5.24 alike; the tests check the result):
#  - Qwen2/2.5-VL's own SDPA path separates packed rows only with 4-row position ids (row 0: per-row
#    text positions), attention_mask=None AND use_cache=False, and then builds a dense (1, 1, S, S)
#    mask. With 3-row ids, the default cache or an all-ones mask the rows silently run as ONE causal
#    sequence (hidden states off by O(1), no error). So the decoder gets its 3-row ids, no cache and
#    a dict of prepared masks that are all None (the form generate passes): transformers builds no
#    mask, and packed_sdpa, registered through AttentionInterface, separates the rows itself.
#  - The attention function is looked up by name at every call, also when backward recomputes a
#    gradient-checkpointed layer: the name is set once and for good (set and restored around the
#    forward, the recompute would run plain SDPA and torch raises a CheckpointError).
#  - FlexAttention needs no torch.compile on a CPU in torch 2.13 but has no CPU backward there, and
#    eager it is ~100x slower than per-row SDPA; varlen_attn is CUDA-only. Per-row SDPA runs both on
#    the CPU and on a GPU (causal, no mask: SDPA may take its flash kernel).
#  - Rotary cos/sin are computed in float32 from absolute positions: a row's exact positions
#    reproduce the padded path bit for bit (a constant shift would not: ~3e-5 at a shift of 1,000).

PACKED_ATTENTION = "packed_sdpa"


def check_budget(args):
    """--max-tokens-per-micro-batch, before the model loads: the longest possible row must fit one
    micro-batch, so that a long row fails now, not hours into a run (the budget is what memory was
    sized for: a row over it is an out-of-memory error in waiting)."""
    longest = args.max_prompt_length + args.max_response_length
    if args.pack == "on" and args.max_tokens_per_micro_batch < longest:
        raise SystemExit(f"error: --max-tokens-per-micro-batch {args.max_tokens_per_micro_batch} < "
                         f"--max-prompt-length {args.max_prompt_length} + --max-response-length "
                         f"{args.max_response_length}: the longest row would not fit one "
                         f"micro-batch; raise it to at least {longest} (or --pack off)")


def plan_micro_batches(tokens, groups, max_tokens):
    """One rank's rows -> [[row indices]]: micro-batches of at most max_tokens tokens.
    tokens[i]: row i's prompt + response length, what it costs packed; groups[i]: its prompt (any
    hashable; the rows of a prompt in one micro-batch share one vision forward).

    First-fit-decreasing on groups, balanced: k = ceil(total / max_tokens) micro-batches, the fewest
    forwards possible. Groups, largest first, each go whole into the least-loaded micro-batch that
    holds them, so loads come out even rather than full-then-empty. A group that fits none whole is
    cut: its rows, largest first, fill the emptiest micro-batches (a group is cut only where keeping
    it whole would cost a forward). If even its rows do not fit, k grows by one and packing starts
    over. Rows keep their order inside a micro-batch, micro-batches are ordered by their first row;
    ties go to the lower index: deterministic. A row over the budget raises ValueError."""
    assert len(groups) == len(tokens)
    for i, t in enumerate(tokens):
        if t > max_tokens:
            raise ValueError(f"row {i} has {t} tokens (prompt + response) > "
                             f"--max-tokens-per-micro-batch {max_tokens}")
    by_group = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    size = lambda rows: sum(tokens[i] for i in rows)  # noqa: E731
    units = sorted(by_group.values(), key=lambda rows: (-size(rows), rows[0]))
    k, bins = max(1, -(-sum(tokens) // max_tokens)), []
    while units:
        bins, load = [[] for _ in range(k)], [0] * k
        for rows in units:
            fits = [b for b in range(k) if load[b] + size(rows) <= max_tokens]
            if fits:  # whole, into the least-loaded micro-batch that holds it
                b = min(fits, key=lambda b: (load[b], b))
                bins[b], load[b] = bins[b] + rows, load[b] + size(rows)
                continue
            rest = sorted(rows, key=lambda i: (-tokens[i], i))
            while rest:  # cut: its rows fill the emptiest micro-batches
                b, put = min(range(k), key=lambda b: (load[b], b)), []
                for i in rest:
                    if load[b] + tokens[i] <= max_tokens:
                        put.append(i)
                        load[b] += tokens[i]
                if not put:
                    break
                bins[b] += put
                rest = [i for i in rest if i not in put]
            if rest:
                break  # this group does not fit k micro-batches: one more, and start over
        else:
            break  # every group placed
        k += 1
    return sorted((sorted(b) for b in bins if b), key=lambda b: b[0])


def packed_micro_batches(items, tokens, groups, max_tokens):
    """infra.micro_batches by tokens: items -> chunks of at most max_tokens tokens (plan above),
    padded with None (dummy work, in_step) so every rank runs as many forwards."""
    plan = plan_micro_batches(tokens, groups, max_tokens)
    return in_step([[items[i] for i in mb] for mb in plan])


@dataclass
class Pack:
    """One packed micro-batch, built on the CPU by pack_rows; .to(device) before the forward."""
    input_ids: torch.Tensor      # (1, S)
    position_ids: torch.Tensor   # (3, 1, S) M-RoPE (temporal, height, width); a text LM: (1, S)
    seqlens: tuple               # (R,) ints L_i + T_i: row i is positions [o_i, o_i + L_i + T_i)
    lengths: tuple               # (R,) ints T_i
    score_index: torch.Tensor    # (N,) packed positions whose hidden states score the response
    targets: torch.Tensor        # (N,) the response tokens they predict
    row_ids: torch.Tensor        # (N,) each response token's row i ...
    cols: torch.Tensor           # (N,) ... and its place t in that response
    pixel_values: torch.Tensor = None    # (patches, C) the distinct prompts' images, once each
    image_grid_thw: torch.Tensor = None  # (images, 3)
    image_index: torch.Tensor = None     # (K,) packed positions of every row's image tokens
    feature_index: torch.Tensor = None   # (K,) which of the F image features each one receives

    def to(self, device):
        return Pack(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(self).items()})

    def rows(self, x):
        """(N, ...) per response token -> (R, T, ...) per row, T = max T_i, zero past each row's
        end: the padded path's layout (calibrl.policy_loss's inputs)."""
        out = x.new_zeros((len(self.lengths), max(self.lengths)) + x.shape[1:])
        return out.index_put((self.row_ids, self.cols), x)                       # (R, T, ...)

    def tokens(self, loss):
        """Eq. C's inputs as calibrl.update builds them, (R, T) and (R,) -> the per-token form of
        the fused op's flat entry fused_policy_loss_tokens: old_logp / expert_logp (N,), row_ids
        (N,); no mask (every packed response token counts)."""
        at = lambda x: x[self.row_ids, self.cols]                                # (N,)  # noqa
        flat = {k: v for k, v in loss.items() if k != "mask"}
        return {**flat, "old_logp": at(loss["old_logp"]), "expert_logp": at(loss["expert_logp"]),
                "row_ids": self.row_ids}


def pack_rows(model, encs, responses):
    """Rows -> one Pack. encs[i]: row i's prompt encoding (calibrl.encode_prompt: input_ids
    (1, L_i), attention_mask, for a VLM mm_token_type_ids, pixel_values, image_grid_thw);
    responses[i]: (T_i,) ids. Rows whose encoding is the same object (calibrl passes each group's
    g.enc) share one vision forward. Uses the model's config and get_rope_index, no weights: it
    runs on the CPU."""
    vlm = hasattr(model.config, "vision_config")
    merge = model.config.vision_config.spatial_merge_size if vlm else 1
    image_token = getattr(model.config, "image_token_id", None)
    prompt_of, prompts, F = {}, [], 0   # id(enc) -> k; per distinct prompt k: its (L,) ids etc.
    for e in encs:
        if id(e) in prompt_of:
            continue
        if "pixel_values_videos" in e:
            raise NotImplementedError("packing rows with videos")
        ids = e["input_ids"][0]                                                  # (L,)
        if vlm:
            mm = e.get("mm_token_type_ids", torch.zeros_like(e["input_ids"]))
            if mm[0, -1] != 0:
                raise ValueError("a prompt ending in an image token: its response positions would "
                                 "not continue its text positions")
            # M-RoPE of the unpadded prompt, images included, by the model's own rule
            pos = model.model.get_rope_index(e["input_ids"], mm_token_type_ids=mm,
                                             image_grid_thw=e.get("image_grid_thw"))[0][:, 0]
        else:
            pos = torch.arange(len(ids))[None]                                   # (1, L)
        grid = e.get("image_grid_thw")                                           # (images, 3)
        n_feat = int((grid.prod(-1) // merge ** 2).sum()) if grid is not None else 0
        prompt_of[id(e)] = len(prompts)
        prompts.append(dict(enc=e, ids=ids, pos=pos, n_feat=n_feat, first_feat=F))  # pos (3|1, L)
        F += n_feat
    parts = {k: [] for k in ("ids", "pos", "score", "targets", "row_ids", "cols", "img", "feat")}
    seqlens, o = [], 0                                     # o: packed offset of row i
    for i, (e, r) in enumerate(zip(encs, responses)):
        p = prompts[prompt_of[id(e)]]
        L, T = len(p["ids"]), len(r)
        parts["ids"] += [p["ids"], r.to(p["ids"].dtype)]
        # the response is text after the prompt's last (text) token: +1 per token, in every row
        parts["pos"] += [p["pos"], p["pos"][:, -1:] + 1 + torch.arange(T)]     # (3|1, L + T)
        parts["score"].append(o + L - 1 + torch.arange(T))                      # p predicts p + 1
        parts["targets"].append(r)
        parts["row_ids"].append(torch.full((T,), i))
        parts["cols"].append(torch.arange(T))
        if p["n_feat"]:
            at = (p["ids"] == image_token).nonzero()[:, 0]                       # (n_feat,)
            assert len(at) == p["n_feat"], f"{len(at)} image tokens, {p['n_feat']} image features"
            parts["img"].append(o + at)
            parts["feat"].append(p["first_feat"] + torch.arange(p["n_feat"]))
        seqlens.append(L + T)
        o += L + T
    seen = [p["enc"] for p in prompts if p["n_feat"]]
    cat = lambda key, dim=0: torch.cat(parts[key], dim) if parts[key] else None  # noqa: E731
    return Pack(input_ids=cat("ids")[None],                                      # (1, S)
                position_ids=cat("pos", 1)[:, None] if vlm else cat("pos", 1),  # (3, 1, S) / (1, S)
                seqlens=tuple(seqlens), lengths=tuple(len(r) for r in responses),
                score_index=cat("score"), targets=cat("targets"), row_ids=cat("row_ids"),
                cols=cat("cols"),
                pixel_values=torch.cat([e["pixel_values"] for e in seen]) if seen else None,
                image_grid_thw=torch.cat([e["image_grid_thw"] for e in seen]) if seen else None,
                image_index=cat("img"), feature_index=cat("feat"))


def packed_sdpa(module, query, key, value, attention_mask, packed_seqlens=None, **kwargs):
    """query (1, nh, S, hd), key / value (1, nkv, S, hd) -> (1, S, nh, hd), None.
    With packed_seqlens (R,): causal SDPA on each row's slice alone, so no (S, S) mask exists and a
    row costs O(n_i^2), not O(S^2); a Python loop over a few dozen rows per layer. Without it:
    transformers' SDPA unchanged (generate, the padded path)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if packed_seqlens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None or query.shape[0] != 1 or kwargs.get("sliding_window"):
        raise ValueError("packed attention takes one packed row, no mask, no sliding window")
    kwargs.pop("is_causal", None)
    rows = zip(*(x.split(packed_seqlens, 2) for x in (query, key, value)))  # (1, n*, n_i, hd) each
    out = [sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
           for q, k, v in rows]                                          # (1, n_i, nh, hd) each
    return torch.cat(out, 1), None                                               # (1, S, nh, hd)


def text_decoder(model):
    """The decoder that takes inputs_embeds: a VLM's language_model, a text LM's model."""
    return model.model.language_model if hasattr(model.config, "vision_config") else model.model


def enable_packed_attention(model):
    """At load time (calibrl.load_model, before sharding): register packed_sdpa, with SDPA's mask
    builder under the same name, and make it the decoder's attention. Everything but a packed
    forward still gets plain SDPA (generate and the padded path: tested bit for bit); the vision
    tower keeps its own attention (it separates images by cu_seqlens). A model on another attention
    is left alone; packed_hidden then refuses to run."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    config = text_decoder(model).config
    if config._attn_implementation == "sdpa":
        config._attn_implementation = PACKED_ATTENTION
    return model


def image_features(model, pixel_values, image_grid_thw):
    """(patches, C), (images, 3) -> (F, H) merged image features in image order (one pass)."""
    out = model.model.get_image_features(pixel_values, image_grid_thw)
    feats = getattr(out, "pooler_output", out)  # 5.x: an output whose pooler_output is per image
    return torch.cat(feats) if isinstance(feats, (list, tuple)) else feats


def packed_hidden(model, pack):
    """The packed forward, inside calibrl.Policy.forward (under FSDP2 whatever touches the weights
    runs inside the root's forward) -> hidden states (N, H) at the response-scoring positions.
    One vision forward for the micro-batch's distinct prompts, its features placed at every row's
    image tokens (autograd sums the rows' gradients into the one forward), one decoder forward.
    Under torchrun a micro-batch without images still runs the vision tower (a blank 2x2-patch
    image, times 0): FSDP's gathers of the vision unit must pair up with the ranks that have
    images (otherwise gloo fails on mismatched collectives and NCCL hangs)."""
    lm = text_decoder(model)
    if lm.config._attn_implementation != PACKED_ATTENTION:
        raise ValueError(f"packing needs SDPA attention, set up by enable_packed_attention; the "
                         f"model uses {lm.config._attn_implementation!r}: run with --pack off")
    embeds = model.get_input_embeddings()(pack.input_ids)                        # (1, S, H)
    if pack.pixel_values is not None:
        feats = image_features(model, pack.pixel_values, pack.image_grid_thw)    # (F, H)
        embeds = embeds.index_put((torch.zeros_like(pack.image_index), pack.image_index),
                                  feats[pack.feature_index].to(embeds.dtype))    # (1, S, H)
    elif distributed() and hasattr(model.config, "vision_config"):
        vc = model.config.vision_config
        m, C = vc.spatial_merge_size, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        grid = torch.tensor([[1, m, m]], device=embeds.device)
        blank = image_features(model, embeds.new_zeros(m * m, C), grid)          # (1, H)
        embeds = embeds + 0 * blank.sum().to(embeds.dtype)
    kinds = getattr(lm.config, "layer_types", None) or ["full_attention"]
    no_masks = {kind: None for kind in kinds}  # "prepared", all None: transformers builds none
    hidden = lm(inputs_embeds=embeds, position_ids=pack.position_ids, attention_mask=no_masks,
                use_cache=False, packed_seqlens=pack.seqlens).last_hidden_state   # (1, S, H)
    return hidden[0, pack.score_index]                                           # (N, H)


def num_images(enc):
    """Images in one prompt encoding."""
    return len(enc["image_grid_thw"]) if enc.get("image_grid_thw") is not None else 0


FORWARDS = dict(positions=0, padding=0, images=0)  # this rank's, since the last perf_metrics


def count_forward(encs, responses, packed, weight=1.0):
    """One forward of the pi_old pass or the update, into FORWARDS. Padded (calibrl.collate):
    R * (L + T) positions, every row's images. Packed: no padding, each distinct prompt's images
    once. A weight-0 dummy forward (in_step) scores nothing: all its positions count as padding."""
    real = sum(e["input_ids"].shape[1] + len(r) for e, r in zip(encs, responses))
    if packed:
        positions, images = real, sum(num_images(e) for e in {id(e): e for e in encs}.values())
    else:
        L, T = max(e["input_ids"].shape[1] for e in encs), max(len(r) for r in responses)
        positions, images = len(encs) * (L + T), sum(num_images(e) for e in encs)
    FORWARDS["positions"] += positions
    FORWARDS["padding"] += positions - (real if weight else 0)
    FORWARDS["images"] += images


def peak_memory_gb(device):
    """The CUDA allocator's peak on a GPU (reset by perf_metrics: per step), else this process's
    peak resident set size (which only grows; Linux reports KiB)."""
    import resource
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def perf_metrics(encs, device):
    """The step's perf/pad_frac (padding / all positions forwarded in the pi_old pass and the
    update), perf/vision_encodes (images encoded there / images in the step's prompts `encs`) and
    mem/peak_gb (the largest rank's), over all ranks; then the counters start afresh."""
    t = all_sum(torch.tensor([FORWARDS["positions"], FORWARDS["padding"], FORWARDS["images"],
                              sum(num_images(e) for e in encs)], dtype=torch.float64))
    peak = all_max(peak_memory_gb(device))
    FORWARDS.update(positions=0, padding=0, images=0)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return {"perf/pad_frac": (t[1] / t[0].clamp(min=1)).item(),
            "perf/vision_encodes": (t[2] / t[3].clamp(min=1)).item(), "mem/peak_gb": peak}
