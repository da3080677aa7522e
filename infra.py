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

It imports nothing from calibrl.py: calibrl passes in what the machinery needs (its prompt
builder, its answer check), so there is no import circle.
"""
import contextlib
import io
import json
import math
import os
import random
import re
import signal
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# torchrun and FSDP2: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK; `python calibrl.py` is rank 0.

def setup_distributed(timeout=600.0):
    """-> rank, world, device; under torchrun (even with one process) a process group for FSDP2,
    whose collectives give up after `timeout` seconds (--dist-timeout) instead of torch's 30
    minutes, so a rank waiting on a frozen peer stops (run() below turns that into one line)."""
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


RANGES = {  # flag: the values it allows (and every value must be finite)
    "steps": ">= 1", "group_size": ">= 1", "prompts_per_step": ">= 1", "mini_batch_prompts": ">= 1",
    "micro_batch_size": ">= 1", "rollout_batch_prompts": ">= 1", "ppo_epochs": ">= 1",
    "max_bad_steps": ">= 1", "eval_samples": ">= 1", "max_prompt_length": ">= 1",
    "max_response_length": ">= 1", "eval_every": ">= 0", "save_every": ">= 0",
    "eval_max_prompts": ">= 0", "warmup_steps": ">= 0", "seed": ">= 0", "weight_decay": ">= 0",
    "lam": ">= 0", "clip_high": ">= 0", "lr": "> 0", "temperature": "> 0", "max_grad_norm": "> 0",
    "reward_timeout": "> 0", "reward_budget": "> 0", "dist_timeout": "> 0", "clip_c": "> 1",
    "top_p": "(0, 1]", "clip_low": "[0, 1)", "alpha": "[0, 1]", "mixup_ratio": "[0, 1]",
    "mixup_pass_min": "[0, 1]", "mixup_pass_max": "[0, 1]",
}


def allows(rule, v):
    """'>= 1', '> 0', '(0, 1]', '[0, 1)' ... -> whether v is finite and within."""
    if not math.isfinite(v):
        return False
    if rule[0] in "<>":
        op, x = rule.split()
        return v >= float(x) if op == ">=" else v > float(x)
    lo, hi = (float(t) for t in rule[1:-1].split(","))
    return (lo <= v if rule[0] == "[" else lo < v) and (v <= hi if rule[-1] == "]" else v < hi)


def check_args(args, world):
    """User errors in the flags: each one message naming the flag and what it allows, before the
    model loads."""
    for name, rule in RANGES.items():
        v = getattr(args, name, None)
        if v is not None and not allows(rule, v):  # None: unset (paper steps: one epoch)
            where = f"in {rule}" if rule[0] in "[(" else rule
            raise SystemExit(f"error: --{name.replace('_', '-')} {v}: must be {where}")
    if args.eval_only and not args.eval_data and args.model:  # (the demo has its own val split)
        raise SystemExit("error: --eval-only needs --eval-data (the problems to evaluate on)")
    if args.prompts_per_step % world or args.mini_batch_prompts % world:
        raise SystemExit(f"error: --prompts-per-step ({args.prompts_per_step}) and "
                         f"--mini-batch-prompts ({args.mini_batch_prompts}) must be multiples of "
                         f"the number of ranks ({world})")


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
    """-> [(row number from 1, in file order; row dict or BadRow)]. A file that cannot be read at
    all ends the run with one message; a line that is not JSON (or not UTF-8) is one bad row."""
    where = f"data file {path}"
    if os.path.isdir(path):
        raise SystemExit(f"error: {where}: is a folder (give a .parquet or .jsonl file)")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {where}: not found")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".parquet", ".jsonl", ".json"):
        raise SystemExit(f"error: {where}: unknown format '{ext}' (use .parquet or .jsonl: one "
                         "JSON object per line)")
    try:
        if ext == ".parquet":
            import pyarrow.parquet as pq
            rows = list(enumerate(pq.read_table(path).to_pylist(), 1))
        else:
            with open(path, "rb") as f:
                rows = [(n, _json_row(line)) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {where}: unreadable ({type(e).__name__}: {e})")
    if not rows:
        raise SystemExit(f"error: {where}: no rows")
    return rows


def _json_row(line):
    """One line of a .jsonl file (bytes) -> the row, or a BadRow saying why not."""
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return BadRow("json", f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})")
    except json.JSONDecodeError as e:
        return BadRow("json", f"invalid JSON ({e.msg} at column {e.colno})")


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
    messages = [_message(m, k) for k, m in enumerate(prompt)]
    if not any(m["role"] == "user" for m in messages):
        raise BadRow("prompt", "no user message (the question goes in one)")
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
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise BadRow(key, "missing or empty (neither reward_model.ground_truth nor answer)")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise BadRow(key, f"wrong type ({type(answer).__name__}; a string or a number)")
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


ROLES = ("system", "user", "assistant")


def _message(m, k):
    """A chat message of a row -> {role, content: [parts]}; raises BadRow naming what is wrong."""
    role, content = m.get("role", "user"), m["content"]
    if role not in ROLES:
        raise BadRow("prompt", f"message {k + 1}: unknown role {role!r} "
                               f"(one of {', '.join(ROLES)})")
    if isinstance(content, str):
        return {"role": role, "content": to_parts(content)}
    parts = isinstance(content, list) and all(isinstance(p, dict) and "type" in p for p in content)
    if not parts:
        what = type(content).__name__ if not isinstance(content, list) else "a list of non-parts"
        raise BadRow("prompt", f"message {k + 1}: content of the wrong type ({what}; a string or a "
                               "list of parts {type: text | image})")
    return {"role": role, "content": list(content)}


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
            try:  # the processor refuses some images (an aspect ratio over 200, say)
                n_prompt = prepare(ex)
            except (ValueError, TypeError, KeyError) as e:
                why = f"the processor refuses it ({type(e).__name__}: {str(e).splitlines()[0]})"
                raise BadRow("images" if ex["images"] else "prompt", why[:200])
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
        try:
            pred, gt = conn.recv()
        except (EOFError, OSError):  # the trainer is gone (even killed): leave without a word
            return
        try:
            conn.send((check(pred, gt), 0))
        except Exception:
            conn.send((0.0, 1))


MAX_ANSWER_CHARS = 1000  # longer answers are compared as strings only (math-verify: ~3 s per MB)


class Verifier:
    """check(pred, gt) in a worker process, bounded by `timeout` seconds per check and `budget`
    seconds per training step (start_step() resets it). A check that times out or raises scores 0;
    so does an answer longer than MAX_ANSWER_CHARS or one met after the step's budget is spent
    (the caller has already compared the normalised strings). All of them count in `failures`;
    `spent` is the step's checking time. A killed worker is restarted on the next call."""
    def __init__(self, check, timeout=5.0, budget=60.0):
        self.check, self.timeout, self.budget, self.proc = check, timeout, budget, None
        self.failures, self.spent = 0, 0.0

    def start_step(self):
        self.spent = 0.0

    def __call__(self, pred, gt):
        if max(len(pred), len(gt)) > MAX_ANSWER_CHARS or self.spent >= self.budget:
            self.failures += 1
            return 0.0
        t0 = time.time()
        try:
            return self._check(pred, gt)
        finally:
            self.spent += time.time() - t0

    def _check(self, pred, gt):
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


class Abandon(Exception):
    """A stop request agreed by every rank while the step's weights have not moved yet."""


class StopRequest:
    """SIGTERM, SIGINT and SIGUSR1 (which schedulers send ahead of a time limit) set a flag instead
    of killing the run. requested() is this rank's flag (no collective: generation polls it to end
    early); agreed() asks every rank (a collective); check() raises Abandon once agreed."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.flag, self.handlers = [], {}

    def install(self):
        self.flag.clear()
        self.handlers = {sig: signal.signal(sig, lambda *_: self.flag.append(1))
                         for sig in self.SIGNALS}

    def restore(self):
        for sig, h in self.handlers.items():
            signal.signal(sig, h)
        self.handlers = {}

    def requested(self):
        return bool(self.flag)

    def agreed(self):
        return all_max(len(self.flag)) > 0

    def check(self):
        if self.agreed():
            raise Abandon()


STOP = StopRequest()  # signals are per process: one flag for the whole run


def stop_criteria():
    """For transformers' generate: every sequence ends at the next token once this rank has a stop
    request (under synced_gpus it then steps along with the others until they end too)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Requested(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), STOP.requested(), device=input_ids.device)
    return StoppingCriteriaList([Requested()])


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


class Logger:
    """metrics.jsonl: one JSON object per line, written whole (a failed write is cut back, so the
    file never ends in half a line); one line per step on stdout; TensorBoard on request."""
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

    def truncate(self, start, say):
        """On resume: keep the rows of steps up to `start` (none when starting afresh: step 0's
        evaluation runs again), drop a torn last line; rewritten through a temporary file."""
        if self.rank != 0 or not os.path.exists(self.path):
            return
        keep, torn = [], 0
        for line in open(self.path, encoding="utf-8", errors="replace"):
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                torn += 1  # half a line from a run killed while writing
                continue
            if start > 0 and step <= start:
                keep.append(line if line.endswith("\n") else line + "\n")
        if torn:
            say(f"note: {self.path}: dropped {torn} unreadable line(s)")
        write_atomic(self.path, "".join(keep).encode())

    def log(self, step, metrics):
        if self.rank != 0:
            return
        append_line(self.path, json.dumps({"step": step, **metrics}) + "\n")
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


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


def append_line(path, line):
    """Append one whole line: if the write fails (a full disk), cut the file back to where it was
    and stop with a clear message; the newest checkpoint stays the place to resume from."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    try:
        _write_all(fd, line.encode())
    except OSError as e:
        os.ftruncate(fd, size)
        raise SystemExit(f"error: cannot write {path} ({e.strerror or e}); the metrics are as they "
                         "were, and --resume continues from the newest checkpoint")
    finally:
        os.close(fd)


def write_atomic(path, data):
    """Replace a file's contents through a temporary file and a rename: a crash keeps the old."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# Checkpoints and exact resume. A checkpoint is complete only when its manifest (every file and its
# size, written last) matches what is on disk; --resume takes the newest complete one.

def rng_state():
    return dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(rng):
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])


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
            write_atomic(os.path.join(tmp, "trainer.json"), json.dumps(trainer).encode())
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
        write_atomic(os.path.join(tmp, "manifest.json"), json.dumps(files, indent=0).encode())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()
    return final


def world_size():
    return torch.distributed.get_world_size() if distributed() else 1


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


def get_rank():
    return torch.distributed.get_rank() if distributed() else 0


def load_checkpoint(policy, opt, sched, stream, path, rank):
    """Restore everything save_checkpoint wrote; returns the step to continue after."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    with open(os.path.join(path, "trainer.json")) as f:
        t = json.load(f)
    if t.get("world", 1) != world_size():
        raise SystemExit(f"error: {path} was written by {t['world']} ranks; resume it with as many "
                         f"(this run has {world_size()}): each rank's random stream is its own")
    model_sd, optim_sd = get_state_dict(policy, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(path, "state"))
    set_state_dict(policy, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    stream.epoch, stream.pos = t["epoch"], t["pos"]
    sched.load_state_dict(t["sched"])
    set_rng_state(torch.load(os.path.join(path, f"rng-{rank}.pt"), weights_only=False))
    return t["step"]


def resume(policy, opt, sched, stream, out_dir, logger, args, rank, say):
    """--resume: restore the newest complete checkpoint, saying which newer ones are skipped and
    why; -> the step to continue after (0: none, the run starts afresh and its old rows go)."""
    if not args.resume:
        return 0
    start = 0
    for step, path in reversed(checkpoints(out_dir)):
        why = all_max(incomplete(path) is not None)  # every rank must agree on the one it takes
        if why:
            say(f"warning: skipping {path}: {incomplete(path) or 'incomplete on another rank'}")
            continue
        start = load_checkpoint(policy, opt, sched, stream, path, rank)
        say(f"resuming from {path} (step {start})")
        break
    else:
        say(f"note: --resume: no complete checkpoint in {out_dir}; starting from step 0")
    logger.truncate(start, say)
    return start


RUN_FILES = re.compile(r"metrics\.jsonl|checkpoint-\d+(\.tmp)?|events\.out\.tfevents\..*")
_LOCKS = {}


def prepare_output_dir(args, rank):
    """--output-dir, default runs/<algo>-<timestamp>; every rank uses rank 0's. Rank 0 locks it for
    the run (a second run on it stops at once). A folder holding an earlier run's files is refused
    unless --resume (continue it) or --overwrite (clear it first) is given."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = args.output_dir or os.path.join("runs", f"{args.algo}-{stamp}")
    if distributed():
        box = [out_dir]
        torch.distributed.broadcast_object_list(box)
        out_dir = box[0]
    problem = None
    if rank == 0:
        try:
            os.makedirs(out_dir, exist_ok=True)
            problem = _lock(out_dir)
        except OSError as e:
            problem = f"cannot be used ({e.strerror or e})"
        names = [] if problem else os.listdir(out_dir)
        earlier = sorted(f for f in names if RUN_FILES.fullmatch(f))
        if earlier and not (args.resume or args.overwrite or args.eval_only):
            problem = (f"holds an earlier run ({', '.join(earlier[:3])}"
                       f"{' ...' if len(earlier) > 3 else ''}); pass --resume to continue it or "
                       "--overwrite to start afresh")
        if earlier and args.overwrite and not args.resume and not problem:
            import shutil
            for f in earlier:
                p = os.path.join(out_dir, f)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    box = [problem]
    if distributed():
        torch.distributed.broadcast_object_list(box)
    if box[0]:
        release(out_dir)
        raise SystemExit(f"error: output folder {out_dir} {box[0]}")
    return out_dir


def _lock(out_dir):
    """An exclusive lock on out_dir/.lock for as long as the run lasts (the OS drops it when the
    process ends, however it ends); -> None, or why it cannot be had."""
    import fcntl
    release(out_dir)  # this process's earlier run on the folder (in-process callers, tests)
    fd = os.open(os.path.join(out_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return "is in use by another run (it holds .lock); wait for it or pick another folder"
    _LOCKS[os.path.abspath(out_dir)] = fd
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return None


def release(out_dir):
    fd = _LOCKS.pop(os.path.abspath(out_dir), None)
    if fd is not None:
        os.close(fd)


def finishes(main):
    """main, which however it ends (returns, SystemExit, an error) restores the signal handlers,
    unlocks its output folder and closes the process group."""
    import functools

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        finally:
            STOP.restore()
            for path in list(_LOCKS):
                release(path)
            if distributed():
                torch.distributed.destroy_process_group()
    return wrapped


def run(main):
    """`python calibrl.py` / torchrun: main(), with a collective that timed out (a frozen or dead
    peer, --dist-timeout) turned into one line and exit code 1 instead of a traceback."""
    try:
        main()
    except (RuntimeError, torch.distributed.DistError) as e:
        text, rank = str(e).lower(), os.environ.get("RANK", "0")
        if "timed out" in text or "timeout" in text:
            raise SystemExit(f"error: rank {rank}: a collective waited longer than --dist-timeout "
                             f"for another rank (frozen?): {str(e).splitlines()[0][:200]}")
        if "closed by peer" in text or "connection reset" in text:
            raise SystemExit(f"error: rank {rank}: another rank is gone (see its own message)")
        raise
