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
  rollout engine       generate: calls sized by a token budget (plan_calls), each prompt
                       prefilled once, a static KV arena, exact sampling; rollout_metrics
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
import math
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
    "micro_batch_size": ">= 1", "rollout_max_tokens": ">= 1", "ppo_epochs": ">= 1",
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
            k = args.group_size if train else max(args.eval_samples, 1)  # samples per prompt
            if too_long([n_prompt], k, args.max_response_length, args.rollout_max_tokens):
                need = call_tokens(n_prompt, k, args.max_response_length)
                raise BadRow("prompt", f"{n_prompt} tokens need {need} KV positions with {k} "
                             f"samples of --max-response-length {args.max_response_length} > "
                             f"--rollout-max-tokens {args.rollout_max_tokens}")
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
    if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"):
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


RUN_FILES = re.compile(r"metrics\.jsonl|checkpoint-\d+(\.tmp)?|events\.out\.tfevents\..*")
_LOCKS = {}  # abspath of a locked run folder -> the fd holding its flock


def _drop_locks_in_child():
    """A forked child (the answer checker's worker) shares the lock's open file: had it kept it,
    the lock would outlive the run (a second in-process run on the folder refused). The child
    closes its copies; the parent's lock stands."""
    for fd in _LOCKS.values():
        os.close(fd)
    _LOCKS.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


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

# -----------------------------------------------------------------------------
# Rollout engine: calibrl.generate's G samples per prompt without transformers'
# `generate`, at the paper's scale:
#  1. Memory by budget: plan_calls puts a rank's prompts, longest first, into calls whose KV cache
#     fits --rollout-max-tokens positions (call_tokens); too_long reports, at data validation, a
#     prompt that cannot fit a call on its own.
#  2. Prefill once per prompt: a prompt (its images included) runs through the model once; its G
#     samples share that prompt's KV cache instead of holding G copies of it.
#  3. No waste in decoding: one KV arena per rollout, preallocated (no cache that grows by
#     concatenation); prompts whose samples all ended leave the batch and rows shrink to their
#     live samples; on CUDA the decode step can be a CUDA graph (cuda_graph, off by default: no
#     GPU measurement yet).
#  4. Exact sampling: calibrl.sampling_config's distribution, softmax(logits / T) over every id but
#     the suppressed ones (top-p only if asked), drawn from the global torch RNG of the rollout
#     device, so a checkpoint's RNG state resumes exactly; each token comes with its log-prob under
#     the sampler (rollout/logprob_gap).
#
# How a call decodes -- the G samples of a prompt share one batch row of the cache:
#   cache row b: [ prompt b (n_b tokens) | pad to P | step-0 keys of its q slots | step 1 | ... ]
# At each step a row feeds the last token of each of its q <= G live samples as q query positions;
# their keys and values become q new columns, and a mask lets each sample see the prompt's columns
# and its own earlier columns only. The prompt is stored and read once per row, not G times (with
# 1,000-token prompts, G = 10 and 512 new tokens: 2.5x less KV to hold and to read). The mask is
# an explicit tensor, so attention runs through rollout_attention (registered with transformers,
# switched on only inside generate), which also folds the query heads sharing a KV head into the
# query axis: grouped-query models never copy K and V per head.
#
# Budget accounting (call_tokens): a call of B prompts padded to P tokens, n samples of at most T
# tokens, allocates B * S KV positions per layer, S = P + n * T rounded up to a multiple of ALIGN
# (the prompt once, n * T sample positions). A position costs 2 * layers * kv_heads * head_dim *
# bytes: 36 KiB for Qwen2.5-VL-3B in bf16. A prefill forward takes at most prefill_tokens prompt
# tokens (at least one prompt), so prefill activations stay bounded too.
#
# FSDP2: generate needs whole weights (inside gathered(policy), through policy's forward); then no
# forward runs a collective, so ranks run their own numbers of calls and decode steps (no
# synced_gpus). The only collective is the optional all_sum, once per call, for global progress:
# then every rank runs n_calls calls, those past its own plan being dummies without a forward.
#
# Shapes: B prompts in a call, G samples per prompt (= n), q live sample slots per row (q <= G),
# P padded prompt length, T response budget, S cache columns per row, K columns attended at a step,
# H query heads, kvh KV heads, rep = H // kvh, hd head dim, A rotary axes (3: M-RoPE), V vocab.

ALIGN = 16  # cache columns per row are a multiple of this: aligned mask and KV rows for SDPA


def call_tokens(P, n, max_new_tokens, B=1):
    """KV positions (per layer) that a call of B prompts padded to P tokens allocates."""
    return B * (-(-(P + n * max_new_tokens) // ALIGN) * ALIGN)


def max_prompt_length(n, max_new_tokens, max_tokens):
    """The longest prompt that fits the budget on its own (0 if none does)."""
    return max(0, (max_tokens // ALIGN) * ALIGN - n * max_new_tokens)


def too_long(lengths, n, max_new_tokens, max_tokens):
    """-> [(index, positions needed)] of each prompt that cannot fit a call on its own."""
    return [(i, call_tokens(L, n, max_new_tokens)) for i, L in enumerate(lengths)
            if call_tokens(L, n, max_new_tokens) > max_tokens]


class Call:
    """One generate call: prompts (rank-local indices, ascending), P the longest prompt, tokens
    the KV positions it allocates (call_tokens: what the budget counts)."""
    def __init__(self, prompts, P, tokens):
        self.prompts, self.P, self.tokens = prompts, P, tokens

    def __repr__(self):
        return f"Call(prompts={self.prompts}, P={self.P}, tokens={self.tokens})"


def plan_calls(lengths, n, max_new_tokens, max_tokens):
    """lengths: prompt tokens (images included) of each of this rank's prompts -> [Call].
    Prompts are taken longest first, so a call holds prompts of similar length (little padding)
    and its first prompt sets P; a call grows while call_tokens <= max_tokens. Every prompt is in
    exactly one call. The rows a call samples are bounded too: B * n <= max_tokens / T."""
    bad = too_long(lengths, n, max_new_tokens, max_tokens)
    if bad:
        i, need = bad[0]
        raise ValueError(f"prompt {i} ({lengths[i]} tokens) needs {need} KV positions with {n} "
                         f"samples of {max_new_tokens} tokens > max_tokens {max_tokens}")
    calls, cur = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if cur and call_tokens(lengths[cur[0]], n, max_new_tokens, len(cur) + 1) > max_tokens:
            calls.append(cur)
            cur = []
        cur.append(i)
    calls += [cur] if cur else []
    return [Call(sorted(c), lengths[c[0]], call_tokens(lengths[c[0]], n, max_new_tokens, len(c)))
            for c in calls]


class Sampling:
    """What to sample (calibrl.sampling_config states it). Nothing here comes from the model
    folder's generation_config.json."""
    def __init__(self, n, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False, stop_ids=(),
                 suppress_ids=()):
        self.n, self.max_new_tokens = n, max_new_tokens      # G samples of at most T tokens
        self.temperature, self.top_p, self.greedy = temperature, top_p, greedy
        self.stop_ids = tuple(stop_ids)          # a response ends after the first of these
        self.suppress_ids = tuple(suppress_ids)  # never sampled: their scores are -inf


def process_logits(logits, sp, suppress):
    """logits (N, V) any dtype -> scores (N, V) fp32; the sampled distribution is softmax(scores).
    transformers' steps in its order (fp32 copy, suppression, temperature, top-p), so the same
    logits give bit-identical probabilities. suppress: (k,) long ids on the device, or None."""
    scores = logits.float()
    if suppress is not None:
        scores = scores.index_fill(1, suppress, float("-inf"))
    if sp.greedy:
        return scores
    if sp.temperature != 1.0:
        scores = scores / sp.temperature
    if sp.top_p < 1.0:  # nucleus: drop the least likely ids holding <= 1 - top_p, keep at least one
        sorted_scores, idx = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - sp.top_p
        remove[:, -1] = False
        scores = scores.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    return scores


def sample(logits, sp, suppress):
    """logits (N, V) -> token (N,) long, logp (N,) fp32: the token's log-prob under the sampler
    (greedy: argmax, its log-prob under softmax(scores / T), T the training temperature)."""
    scores = process_logits(logits, sp, suppress)
    if sp.greedy:
        tok = scores.argmax(-1)  # on unscaled scores: a division by T can create ties
        if sp.temperature != 1.0:
            scores = scores / sp.temperature
    else:  # softmax then multinomial, as transformers does: the same draws from the same RNG state
        tok = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    logp = scores.gather(1, tok[:, None]).squeeze(1) - scores.logsumexp(-1)
    return tok, logp


class StaticKV:
    """The KV arena: per layer one K and one V buffer of `tokens` positions, allocated at the
    layer's first write (dtype and device of its keys) and reused by every call of the rollout; a
    call views them as (B, kvh, S, hd). transformers' attention layers call update(k, v, layer).
    Modes: ("prefill", r0, r1): rows r0:r1, columns 0:P, returns the fresh keys;
    ("decode", c, q, K): q new columns at c, returns columns 0:K (K >= c+q, a multiple of ALIGN:
    the columns past c+q are masked); ("static", cols): columns at the device tensor cols,
    returns all S columns (fixed shapes, for a CUDA graph)."""
    def __init__(self, tokens):
        self.tokens, self.flat, self.views = tokens, {}, {}
        self.B = self.S = None
        self.mode, self.length = None, 0  # length: columns the last forward wrote up to

    def start_call(self, B, S):
        assert B * S <= self.tokens
        self.B, self.S, self.views = B, S, {}

    def layer(self, i, like=None):
        """-> [K, V] views (B, kvh, S, hd) of layer i (like: its first keys, to allocate)."""
        if i not in self.views:
            if i not in self.flat:
                _, kvh, _, hd = like.shape
                # zeros, not empty: a static step reads columns not yet written; they are masked,
                # but a NaN bit pattern there would still make 0 * NaN = NaN
                self.flat[i] = (kvh, hd, [torch.zeros(self.tokens * kvh * hd, dtype=like.dtype,
                                                      device=like.device) for _ in range(2)])
            kvh, hd, bufs = self.flat[i]
            n = self.B * kvh * self.S * hd
            self.views[i] = [f[:n].view(self.B, kvh, self.S, hd) for f in bufs]
        return self.views[i]

    def update(self, key, value, layer_idx, *args, **kwargs):
        """key, value (b, kvh, q, hd): the forward's new positions -> the K, V attention reads."""
        k, v = self.layer(layer_idx, key)
        if self.mode[0] == "prefill":
            _, r0, r1 = self.mode
            k[r0:r1, :, :key.shape[2]] = key
            v[r0:r1, :, :key.shape[2]] = value
            self.length = key.shape[2]
            return key, value                           # causal attention over the prompts alone
        if self.mode[0] == "decode":
            _, c, q, K = self.mode
            k[:, :, c:c + q] = key
            v[:, :, c:c + q] = value
            self.length = c + q
            return k[:, :, :K], v[:, :, :K]             # (B, kvh, K, hd)
        cols = self.mode[1]                             # static: (q,) long on the device
        k.index_copy_(2, cols, key)
        v.index_copy_(2, cols, value)
        self.length = self.S
        return k, v

    def get_seq_length(self, layer_idx=0):
        """transformers' Cache API (unused: positions and masks are always passed in)."""
        return self.length

    def keep_rows(self, keep):
        """Compact the batch to rows `keep` (ascending ints) in place, without a second copy of
        the cache: row i takes row keep[i] >= i, which no earlier move has overwritten."""
        for i in list(self.views):
            for buf in self.views[i]:
                for dst, src in enumerate(keep):
                    if dst != src:
                        buf[dst].copy_(buf[src])
        self.start_call(len(keep), self.S)


ROLLOUT_ATTENTION = "calibrl_rollout"


def rollout_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      **kwargs):
    """transformers AttentionInterface entry, used inside generate only.
    query (b, H, q, hd); key, value (b, kvh, K, hd) as StaticKV.update returned them.
    attention_mask None: a prefill (right-padded prompts, fresh keys, K == q): causal.
    attention_mask (b, 1, rep*q, K) float: a decode step, with the heads folded as below."""
    F = torch.nn.functional
    b, H, q, hd = query.shape
    kvh = key.shape[1]
    rep = H // kvh
    if attention_mask is None:
        if rep > 1:  # query head h reads KV head h // rep (repeat_kv); a prefill is compute-bound,
            key = key.repeat_interleave(rep, 1)        # so this copy costs little, and plain SDPA
            value = value.repeat_interleave(rep, 1)    # may take its flash kernel
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    else:
        # Fold the rep query heads of each KV head into the query axis: row r*q + j of KV head g
        # is query head g*rep + r at slot j. Each KV head is read once for all of them.
        out = F.scaled_dot_product_attention(query.reshape(b, kvh, rep * q, hd), key, value,
                                             attn_mask=attention_mask, scale=scaling)
        out = out.view(b, H, q, hd)
    return out.transpose(1, 2).contiguous(), None                                # (b, q, H, hd)


def decoder_attention(model):
    """The decoder's self-attention modules (they carry a layer_idx; vision attention has none)."""
    found = [m for m in model.modules() if getattr(m, "layer_idx", None) is not None
             and hasattr(m, "num_key_value_groups") and hasattr(m, "config")]
    if not found:
        raise TypeError(f"{type(model).__name__}: no decoder attention layers with a layer_idx")
    return found


@contextlib.contextmanager
def rollout_attention_on(model):
    """The decoder's attention layers call rollout_attention (the vision tower keeps its own);
    each config's implementation is restored on exit, exceptions included."""
    from transformers import AttentionInterface
    AttentionInterface.register(ROLLOUT_ATTENTION, rollout_attention)
    configs = list({id(m.config): m.config for m in decoder_attention(model)}.values())
    saved = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = ROLLOUT_ATTENTION
    try:
        yield
    finally:
        for c, s in zip(configs, saved):
            c._attn_implementation = s


def prompt_positions(base, enc):
    """One prompt -> (pos (A, n) long, delta int). A = 3 M-RoPE axes for Qwen2-VL-family models
    (image tokens get 2-D grid positions: get_rope_index), else 1. The k-th generated token has
    position n + k + delta on every axis, delta = largest prompt position + 1 - n, per prompt:
    what transformers' generate keeps as rope_deltas (0 without images)."""
    ids = enc["input_ids"]                                                       # (1, n)
    if not hasattr(base, "get_rope_index"):
        return torch.arange(ids.shape[1])[None], 0
    mm = enc.get("mm_token_type_ids")
    mm = torch.zeros_like(ids) if mm is None else mm
    pos, delta = base.get_rope_index(ids, mm, image_grid_thw=enc.get("image_grid_thw"),
                                     attention_mask=enc.get("attention_mask"))  # (3, 1, n), (1, 1)
    return pos[:, 0], int(delta.reshape(-1)[0])


class RolloutModel:
    """What generate needs of a transformers causal LM / VLM, found once: the base model (vision
    tower + decoder, returns hidden states), the LM head, the cache keyword, the mask keys."""
    def __init__(self, model):
        import inspect
        self.model, self.base, self.head = model, model.base_model, model.get_output_embeddings()
        params = inspect.signature(self.base.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in 5.2x
        text = model.config.get_text_config()
        self.layer_types = sorted(set(getattr(text, "layer_types", None) or ["full_attention"]))
        if "sliding_attention" in self.layer_types:
            raise NotImplementedError("rollout engine: sliding-window attention layers")
        self.rep = decoder_attention(model)[0].num_key_value_groups
        self.A = 3 if hasattr(self.base, "get_rope_index") else 1
        self.device = model.get_input_embeddings().weight.device

    def hidden(self, ids, pos, mask, kv, **images):
        """ids (b, q), pos (A, b, q), mask None | (b, 1, rep*q, K) -> last hidden (b, q, H)."""
        out = self.base(input_ids=ids, position_ids=pos if self.A == 3 else pos[0], use_cache=True,
                        attention_mask={t: mask for t in self.layer_types},  # a dict: used as is
                        **{self.cache_kw: kv}, **images)
        return out.last_hidden_state


def prefill(m, encs, call, kv, pad_id, prefill_tokens):
    """Run each prompt of the call through the model once (its images encoded once), writing its
    keys and values into cache row b, columns [0, n_b). -> logits (B, V) at each prompt's last
    token, n_tok (B,) prompt lengths, delta (B,) rope deltas, the compute dtype.
    Prompts are right-padded to P, at most prefill_tokens per forward: with the padding at the
    end, plain causal attention is exact for the real tokens (they never see a pad), so no mask is
    built and SDPA may use its flash kernel. Decoding never sees the pads' columns."""
    dev, B, P = m.device, len(call.prompts), call.P
    pe = [prompt_positions(m.base, encs[i]) for i in call.prompts]
    n_tok = torch.tensor([encs[i]["input_ids"].shape[1] for i in call.prompts])   # (B,)
    delta = torch.tensor([d for _, d in pe])                                      # (B,)
    per, logits = max(1, prefill_tokens // P), []
    for r0 in range(0, B, per):
        rows = list(range(r0, min(B, r0 + per)))
        ids = torch.full((len(rows), P), pad_id, dtype=torch.long)               # (b, P)
        pos = torch.zeros(m.A, len(rows), P, dtype=torch.long)                    # (A, b, P)
        for j, r in enumerate(rows):
            n = int(n_tok[r])
            ids[j, :n] = encs[call.prompts[r]]["input_ids"][0]
            pos[:, j, :n] = pe[r][0]
            pos[:, j, n:] = torch.arange(n, P) + delta[r]                         # pads: unseen
        imgs = [encs[call.prompts[r]] for r in rows
                if encs[call.prompts[r]].get("pixel_values") is not None]
        images = {} if not imgs else dict(  # the images of these rows, in row order
            pixel_values=torch.cat([e["pixel_values"].to(dev) for e in imgs]),
            image_grid_thw=torch.cat([e["image_grid_thw"] for e in imgs]).to(dev))
        kv.mode = ("prefill", r0, r0 + len(rows))
        h = m.hidden(ids.to(dev), pos.to(dev), None, kv, **images)               # (b, P, H)
        last = (n_tok[rows] - 1).to(dev)                                          # (b,)
        logits.append(m.head(h[torch.arange(len(rows), device=dev), last]))      # (b, V)
        dtype = h.dtype
        del h
    return torch.cat(logits), n_tok, delta, dtype


def _bias(seen, rep, dtype):
    """seen (b, q, K) bool, column visible to slot -> additive mask (b, 1, rep*q, K), contiguous,
    rows folded as in rollout_attention. K is a multiple of ALIGN: CUDA's memory-efficient SDPA
    then reads the mask as it is (otherwise it pads a copy expanded over the heads, every layer)."""
    b, q, K = seen.shape
    bias = torch.zeros(b, rep, q, K, dtype=dtype, device=seen.device)
    bias.masked_fill_(~seen[:, None], float("-inf"))
    return bias.view(b, 1, rep * q, K)


class _Meter:
    """A rollout's progress for the `progress` callback: at most one report every `every`
    seconds, the first after `every` seconds, so a short rollout reports nothing. Tokens are
    counted on the device (no sync per step); a report reads them (one sync)."""
    def __init__(self, progress, every, prompts_total, device):
        self.progress, self.every, self.total = progress, every, prompts_total
        self.t0 = self.last = time.time()
        self.prompts = 0                                   # prompts of the calls finished
        self.tokens = torch.zeros((), dtype=torch.long, device=device)

    def tick(self, prompts_in_call=0):
        now = time.time()
        if self.progress is None or now - self.last < self.every:
            return
        self.last, tokens, dt = now, int(self.tokens), now - self.t0
        self.progress(dict(prompts=self.prompts + prompts_in_call, prompts_total=self.total,
                           tokens=tokens, seconds=dt, tokens_per_sec=tokens / max(dt, 1e-9)))


def show_progress(p):
    """The default progress line of a long rollout, on rank 0 only (this rank's own counts)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"  rollout (rank 0): {p['prompts']}/{p['prompts_total']} prompts done, "
              f"{p['tokens']} tokens, {p['tokens_per_sec']:.0f} tokens/s, {p['seconds']:.0f}s",
              flush=True)


def _run_call(m, encs, call, sp, kv, pad_id, suppress, stop, compact, sync_every, prefill_tokens,
              static, graph, meter, interrupt):
    """Prefill, then decode every sample of the call. -> out_tok (B, G, T) long, out_lp (B, G, T)
    fp32, length (B, G) long, on the device (row b is encs[call.prompts[b]]; pad_id after a stop),
    the decode work [query rows fed, rows a batch that never shrinks would feed], and whether
    interrupt() ended the call early (live samples are then cut where they stood)."""
    dev, B, G, T, P = m.device, len(call.prompts), sp.n, sp.max_new_tokens, call.P
    S = call.tokens // B
    kv.start_call(B, S)
    logits, n_tok, delta, dtype = prefill(m, encs, call, kv, pad_id, prefill_tokens)  # (B, V)

    # Token 0: the G rows of a prompt repeat its logits, prompt-major like generate's
    # num_return_sequences, so one multinomial over B*G rows draws what generate would draw.
    tok, lp = sample(logits.repeat_interleave(G, 0), sp, suppress)              # (B*G,)
    tok, lp = tok.view(B, G), lp.view(B, G)
    del logits
    out_tok = torch.full((B, G, T), pad_id, dtype=torch.long, device=dev)
    out_lp = torch.zeros(B, G, T, dtype=torch.float32, device=dev)
    length = torch.full((B, G), T, dtype=torch.long, device=dev)
    row = torch.arange(B, device=dev)                         # (B',) batch row -> call row
    slot = torch.arange(G, device=dev).repeat(B, 1)           # (B', q) sample held by a slot
    alive = torch.ones(B, G, dtype=torch.bool, device=dev)    # (B', q)
    pos0 = (n_tok + delta).to(dev)                            # (B',) position of token 0
    cols = torch.arange(S, device=dev)
    seen = (cols[None, None] < n_tok.to(dev)[:, None, None]).expand(B, G, S).clone()  # (B', q, S)

    def record(t, tok, lp):
        """Write step t's tokens of the live slots; a slot that emits a stop id is done."""
        nonlocal alive
        r = row[:, None].expand_as(slot)
        out_tok[r, slot, t] = torch.where(alive, tok, pad_id)
        out_lp[r, slot, t] = torch.where(alive, lp, 0.0)
        meter.tokens += alive.sum()
        ends = alive & torch.isin(tok, stop)
        length[r, slot] = torch.where(ends, t + 1, length[r, slot])
        alive = alive & ~ends

    record(0, tok, lp)
    c, t = P, 1            # c: next free cache column; t: the step whose token is sampled next
    work, stopped = [0, 0], False
    if static:  # fixed shapes: all G slots, all S columns, one mask updated in place
        bias = _bias(seen, m.rep, dtype)                      # (B, 1, rep*G, S), contiguous
        bias4 = bias.view(B, m.rep, G, S)
        slots, col_buf = torch.arange(G, device=dev), torch.empty(G, dtype=torch.long, device=dev)
        tok_buf, pos_buf = tok.clone(), torch.empty(m.A, B, G, dtype=torch.long, device=dev)
        kv.mode = ("static", col_buf)
        step = lambda: m.head(m.hidden(tok_buf, pos_buf, bias, kv))            # (B, G, V)
    while t < T:
        if interrupt is not None and bool(interrupt()):  # local: no rank waits for another
            r = row[:, None].expand_as(slot)
            length[r, slot] = torch.where(alive, t, length[r, slot])
            stopped = True
            break
        if (t - 1) % sync_every == 0:  # reading device state is a sync: not every step on CUDA
            if not bool(alive.any()):
                break
            if compact and not static:
                counts = alive.sum(1)                         # (B',) live samples per row
                keep = (counts > 0).nonzero().squeeze(1)
                if len(keep) < len(row):  # prompts whose samples all ended leave (cache rows too)
                    kv.keep_rows(keep.tolist())
                    row, slot, alive, tok = row[keep], slot[keep], alive[keep], tok[keep]
                    seen, pos0 = seen[keep], pos0[keep]
                q = int(counts.max())
                if q < slot.shape[1]:  # rows shrink to their live samples: live slots first
                    order = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)[:, :q]
                    slot, alive = slot.gather(1, order), alive.gather(1, order)
                    tok = tok.gather(1, order)
                    seen = seen.gather(1, order[..., None].expand(-1, -1, S))
        Bc, q = slot.shape
        meter.tick(B - Bc)
        # Feed step t-1's tokens at position n + (t-1) + delta; slot j writes cache column c + j.
        pos = (pos0 + (t - 1))[None, :, None].expand(m.A, Bc, q)               # (A, B', q)
        if static:
            bias4[:, :, slots, c + slots] = 0.0
            col_buf.copy_(c + slots)
            tok_buf.copy_(tok)
            pos_buf.copy_(pos)
            logits = graph.replay_or_capture(step) if graph is not None else step()
        else:
            j = torch.arange(q, device=dev)
            seen[:, j, c + j] = True
            K = -(-(c + q) // ALIGN) * ALIGN                  # <= S: S is a multiple of ALIGN
            kv.mode = ("decode", c, q, K)
            mask = _bias(seen[:, :, :K], m.rep, dtype)                         # (B', 1, rep*q, K)
            logits = m.head(m.hidden(tok, pos, mask, kv))                         # (B', q, V)
        c += q
        work[0], work[1] = work[0] + Bc * q, work[1] + B * G
        tok, lp = sample(logits.reshape(Bc * q, -1), sp, suppress)
        tok, lp = tok.view(Bc, q), lp.view(Bc, q)
        record(t, tok, lp)
        t += 1
    return out_tok, out_lp, length, work, stopped


class StepGraph:
    """A CUDA graph of one decode step (static shapes). The first call warms up on a side stream
    and captures; later calls replay. The warm-up runs the same step on the same inputs: it
    writes the same keys into the same cache columns, so it changes nothing. If capture fails (an
    op or a hook that syncs), it warns and the call goes on eagerly."""
    def __init__(self):
        self.graph, self.out, self.failed = None, None, False

    def replay_or_capture(self, step):
        if self.failed:
            return step()
        if self.graph is None:
            try:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        step()
                torch.cuda.current_stream().wait_stream(s)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.out = step()
            except Exception as e:  # noqa: BLE001 -- any capture failure: go on eagerly, loudly
                import warnings
                warnings.warn(f"rollout engine: CUDA graph capture failed ({type(e).__name__}: "
                              f"{e}); decoding eagerly")
                self.graph, self.failed = None, True
                torch.cuda.synchronize()
                return step()
        self.graph.replay()
        return self.out


class Rollout:
    """What generate returns. responses: [len(encs) * n] (T_i,) long on the CPU, sample g of
    prompt p at p*n + g, ending after the first stop id (or truncated at the budget); logprobs:
    the same shapes, fp32, each token's log-prob under the sampler; stats: the rollout's metrics;
    interrupted: interrupt() ended it early (then incomplete: never train on it)."""
    def __init__(self, responses, logprobs, stats, interrupted=False):
        self.responses, self.logprobs, self.stats = responses, logprobs, stats
        self.interrupted = interrupted


def peak_memory_gb(device):
    """The CUDA allocator's peak since the last reset (each rollout, each step's perf_metrics), else
    this process's peak resident set size (which only grows; Linux reports KiB)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@torch.no_grad()
def generate(model, encs, sp, calls, *, pad_id, n_calls=None, all_sum=None, progress=show_progress,
             progress_every=10.0, interrupt=None, compact=True, sync_every=None,
             prefill_tokens=None, cuda_graph=False, static=False):
    """Sample sp.n responses for each prompt -> Rollout.
    model: a transformers causal LM / VLM with whole weights (under FSDP2: inside
      gathered(policy), called from policy's forward); it decodes in eval mode.
    encs: this rank's prompt encodings (calibrl.encode_prompt: input_ids (1, n), attention_mask,
      [mm_token_type_ids, pixel_values, image_grid_thw]), on the CPU or the device.
    calls: plan_calls([n of each prompt], sp.n, sp.max_new_tokens, max_tokens).
    n_calls: calls every rank runs (the max over ranks of len(calls)), the extra ones dummies
      without a forward; with all_sum (sums a float64 tensor over ranks), progress counts all
      ranks, at one all_sum per call. Neither is needed: no forward here runs a collective.
    progress: called with {prompts, prompts_total, tokens, seconds, tokens_per_sec} at most every
      progress_every seconds, never in a rollout shorter than that (default: a line on rank 0).
    interrupt: a callable checked before each call and once per decode step, on this rank alone
      (no collective); once it returns true the call stops where it stands, no later call runs a
      forward (dummies still meet all_sum), and the Rollout comes back with interrupted=True, the
      live samples cut where they stood and the prompts of later calls with empty responses.
    compact: prompts whose samples all ended leave the batch, and rows shrink to their live
      samples (the random draws then differ from transformers' generate; the distribution not).
    sync_every: decode steps between host checks of the finished samples (default 1 on a CPU, 8
      on CUDA, where a check stalls the launch queue); compaction and the stop happen there.
    prefill_tokens: prompt tokens per prefill forward (default min(32768, largest call // 4)).
    cuda_graph: capture the decode step as a CUDA graph (CUDA only; implies static).
    static: fixed-shape decoding -- all G slots, all S columns, no compaction: the graph's step.
    Resets the CUDA peak-memory counter (mem/rollout_peak_gb is the rollout's peak)."""
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise RuntimeError("rollout engine: generate needs whole weights: run it inside "
                           "infra.gathered(policy)")
    m = RolloutModel(model)
    dev, G = m.device, sp.n
    host = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")
    encs = [{k: v.cpu() if k in host else v for k, v in e.items()} for e in encs]  # FSDP moves
    if cuda_graph and dev.type != "cuda":
        import warnings
        warnings.warn("rollout engine: cuda_graph needs a CUDA device; decoding eagerly")
    static = static or (cuda_graph and dev.type == "cuda")
    sync_every = sync_every or (8 if dev.type == "cuda" else 1)
    n_calls = len(calls) if n_calls is None else n_calls
    assert n_calls >= len(calls)
    assert sorted(i for c in calls for i in c.prompts) == list(range(len(encs)))
    max_call = max([c.tokens for c in calls], default=0)
    prefill_tokens = prefill_tokens or max(1, min(32768, max_call // 4))  # GPUs saturate far below
    suppress = (torch.tensor(sp.suppress_ids, dtype=torch.long, device=dev)
                if sp.suppress_ids else None)
    stop = torch.tensor(sp.stop_ids, dtype=torch.long, device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    kv = StaticKV(max_call)  # the arena: the largest call's positions, shared by every call
    responses = [torch.zeros(0, dtype=torch.long)] * (len(encs) * G)
    logprobs = [torch.zeros(0)] * (len(encs) * G)
    total = torch.tensor([float(len(encs)), 0.0], dtype=torch.float64)
    meter = _Meter(progress, progress_every, int((all_sum(total) if all_sum else total)[0]), dev)
    t0, n_tokens, work, stopped = time.time(), 0, [0, 0], False
    # eval mode: no dropout, and no gradient checkpointing (in training mode transformers 5.17
    # drops every layer's cache under it); the caller gets the model back in its own mode
    training = model.training
    with rollout_attention_on(model), contextlib.ExitStack() as restore:
        restore.callback(model.train, training)
        model.eval()
        for k in range(n_calls):
            mine = torch.zeros(2, dtype=torch.float64)           # prompts, tokens of this call
            stopped = stopped or (interrupt is not None and bool(interrupt()))
            if k < len(calls) and not stopped:  # a dummy call runs no forward: none needs one
                call = calls[k]
                graph = StepGraph() if static and cuda_graph and dev.type == "cuda" else None
                *outs, w, stopped = _run_call(m, encs, call, sp, kv, pad_id, suppress, stop,
                                              compact, sync_every, prefill_tokens, static, graph,
                                              meter, interrupt)
                out_tok, out_lp, length = [x.cpu() for x in outs]
                work = [a + b for a, b in zip(work, w)]
                for b, p in enumerate(call.prompts):
                    for g in range(G):
                        n = int(length[b, g])
                        responses[p * G + g] = out_tok[b, g, :n].clone()
                        logprobs[p * G + g] = out_lp[b, g, :n].clone()
                mine[:] = torch.tensor([len(call.prompts), float(length.sum())])
                n_tokens += int(length.sum())
            if all_sum:  # the other ranks' progress too: a rendezvous with them, once a call
                meter.prompts += int(all_sum(mine)[0])
            else:
                meter.prompts += int(mine[0])
    del kv
    dt = time.time() - t0
    stats = {"perf/rollout_tokens_per_sec": n_tokens / max(dt, 1e-9),
             "perf/rollout_calls": len(calls), "perf/rollout_max_call_tokens": max_call,
             "mem/rollout_peak_gb": peak_memory_gb(dev), "rollout/tokens": n_tokens,
             "rollout/seconds": dt, "rollout/decode_rows": work[0],
             "rollout/decode_rows_dense": work[1]}
    return Rollout(responses, logprobs, stats, interrupted=stopped)


def rollout_metrics(stats, groups):
    """The step's rollout metrics, over all ranks: perf/rollout_tokens_per_sec (every rank's
    tokens / the slowest rank's seconds), mem/rollout_peak_gb, perf/rollout_calls and
    perf/rollout_max_call_tokens (the largest of any rank), and rollout/logprob_gap: the
    length-weighted mean |sampler log-prob - pi_old log-prob| over the on-policy tokens, the
    sampler's fidelity (~1e-6 when both are exactly softmax(logits / T); top-p or a drift between
    the rollout and the scoring path shows here)."""
    rows = [r for g in groups for r in g.rows]
    gap = sum(float((r.sample_logp - r.old_logp).abs().sum()) for r in rows)
    n = sum(len(r.resp) for r in rows)
    tokens, gap, n = all_sum(torch.tensor([stats["rollout/tokens"], gap, n])).tolist()
    big = torch.tensor([stats[k] for k in ("rollout/seconds", "mem/rollout_peak_gb",
                                           "perf/rollout_calls", "perf/rollout_max_call_tokens")],
                       dtype=torch.float64)
    if distributed():
        torch.distributed.all_reduce(big, op=torch.distributed.ReduceOp.MAX)
    seconds, peak, calls, biggest = big.tolist()
    return {"perf/rollout_tokens_per_sec": tokens / max(seconds, 1e-9),
            "mem/rollout_peak_gb": peak, "perf/rollout_calls": calls,
            "perf/rollout_max_call_tokens": biggest, "rollout/logprob_gap": gap / max(n, 1)}


# -----------------------------------------------------------------------------
# Packed micro-batches: the pi_old pass and the update without padding, and each
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
#   count_forward, perf_metrics                 perf/pad_frac, perf/vision_encodes, mem/peak_gb
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
