"""
calibrl.py -- CalibRL in one file: hybrid-policy RLVR for vision-language models.

CalibRL (ICLR 2026, "Controllable Exploration in Hybrid-Policy RLVR for Multi-Modal Reasoning") is
GRPO-style RL with verifiable rewards where each prompt's group of G on-policy rollouts is joined by
one expert trajectory. The expert is not imitated: its token log-probs under pi_old are a
calibration baseline l^E in a LeakyReLU-gated, |advantage|-weighted extra term (Eq. C below).
The objective is the one the official code (github.com/zhh6425/CalibRL, a verl fork) computes;
the README lists the equations, the data schema and every logged metric.

Run it:
    python calibrl.py                                   # embedded demo: tiny Qwen2.5-VL, CPU, minutes
    python calibrl.py --algo grpo --steps 2             # a baseline: grpo | luffy | rlplus | calibrl
    torchrun --nproc_per_node=8 calibrl.py --model Qwen/Qwen2.5-VL-3B-Instruct --data train.parquet
    python calibrl.py --eval-only --model runs/x/checkpoint-50 --eval-data val.jsonl

Shapes: P prompts, G rollouts per prompt, R rows (= P*G on-policy rows + at most P expert rows),
L prompt length (left-padded), T response length (right-padded), H hidden size, V vocab size.
Alignment: the logits at sequence position t predict token t+1, so the response tokens at
positions [L, L+T) are scored by the hidden states at positions [L-1, L+T-1).

Departures from the paper and the official code (see README):
 1. l^E at the position right after the expert's last token is 0 like every other position past
    the expert (the official value there is an artefact of sequence packing).
 2. The token-mean is over the whole mini-batch across micro-batches and ranks (num_tokens), so
    the update does not depend on micro-batch size or GPU count (official: per micro-batch).
 3. A prompt without an expert solution (or with pass_ratio <= 0) has l^E = 0 everywhere (the
    official code inserts a 2-token dummy expert).
 4. alpha and lam are flags (hard-coded 0.5 and 0.1 in the official code).
 5. A group with one on-policy row has A = 0 (official: mean 0, std 1, so A = r).
 6. The official "GRPO" baseline (kept here) has no std normalisation, dual clip and token-mean:
    closer to Dr.GRPO / DAPO than to the original GRPO.
 7. Mini-batches hold whole groups (120 prompts = 4 optimizer steps per training step in the paper
    preset; the official code sizes them in rows and makes a short fifth one).
 8. Rows whose advantage is exactly 0 contribute exactly 0 to loss and gradient; they are counted
    in the token-mean but not run through the model in the update.
 9. The expert response is the solution text + the end-of-turn token, teacher-forced after the same
    chat prompt (images included) and scored at the rollout temperature.
10. The images reach the model (the published official code drops them before building the prompt).
11. Qwen's vision tokens are suppressed at sampling and excluded from every log-prob, so pi_old is
    the sampler's distribution; nothing from the model folder's generation_config.json shapes it.
12. Reward: cm² is dropped, a multiple-choice letter is read after the first \\boxed{ wherever it
    stands, a numeric ground truth is read as a string (the official reward does none of these).
13. A uniform group has A = 0 exactly (the official float32 mean leaves ~1e-8).
"""
import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the fused kernels run in Triton's interpreter on a CPU; this must be
    os.environ.setdefault("TRITON_INTERPRET", "1")  # set before anything imports triton (transformers may)

# -----------------------------------------------------------------------------
# Configuration: one block; every field is a --flag, its help string is the docstring.

def arg(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})

@dataclass
class Args:
    model: str = arg(None, "HF id or local path; default: the tiny Qwen2.5-VL in data/")
    data: str = arg(None, "training data, .parquet or .jsonl; default: the bundled demo data")
    eval_data: str = arg(None, "validation data (same schema); default with the demo: its val split")
    algo: str = arg("calibrl", "the objective: CalibRL or one of the paper's baselines", ["calibrl", "grpo", "luffy", "rlplus"])
    preset: str = arg(None, "default: demo without --model, paper with it", ["demo", "paper"])
    steps: int = arg(60, "training steps (one step = rollout + log-probs + update); --preset paper: "
                         "one epoch over --data, as the official run")
    shuffle: bool = arg(True, "reshuffle the data each epoch with --seed (--no-shuffle: file order)")
    output_dir: str = arg(None, "run folder; default runs/<algo>-<timestamp>")
    resume: bool = arg(False, "continue from the newest complete checkpoint in --output-dir")
    overwrite: bool = arg(False, "start afresh in an --output-dir that holds another run's checkpoints")
    skip_bad_rows: bool = arg(False, "drop malformed data rows (reported) instead of stopping before training")
    reward_timeout: float = arg(5.0, "seconds one answer check may take; slower ones score 0 (counted)")
    max_bad_steps: int = arg(3, "stop (after a checkpoint) after this many consecutive steps with a non-finite loss/grad")
    save_every: int = arg(0, "checkpoint every N steps (0: only at the end)")
    eval_every: int = arg(10, "evaluate on --eval-data every N steps (0: never)")
    eval_only: bool = arg(False, "only evaluate --model on --eval-data and exit")
    eval_samples: int = arg(4, "k sampled responses per problem for eval/accuracy and eval/pass@k")
    eval_max_prompts: int = arg(0, "evaluate on at most this many problems (0: all)")
    seed: int = arg(0, "seed of the training stream (data order, sampling, mixup)")
    group_size: int = arg(8, "G: on-policy rollouts per prompt")
    prompts_per_step: int = arg(16, "prompts per training step, over all ranks")
    mini_batch_prompts: int = arg(16, "prompts (whole groups) per optimizer step, over all ranks")
    micro_batch_size: int = arg(64, "rows per forward/backward (gradient accumulation)")
    rollout_batch_prompts: int = arg(64, "prompts per generate call on each rank")
    ppo_epochs: int = arg(1, "passes over the step's rollouts")
    lr: float = arg(1e-4, "AdamW learning rate (constant after warm-up)")
    warmup_steps: int = arg(0, "optimizer steps of linear learning-rate warm-up")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient-norm clip")
    temperature: float = arg(1.0, "sampling temperature (also used for every log-prob)")
    top_p: float = arg(1.0, "nucleus sampling")
    max_prompt_length: int = arg(512, "prompt tokens at most (images included)")
    max_response_length: int = arg(48, "response tokens at most")
    clip_low: float = arg(0.2, "PPO clip epsilon below 1")
    clip_high: float = arg(0.2, "PPO clip epsilon above 1")
    clip_c: float = arg(3.0, "dual-clip constant c for A < 0")
    alpha: float = arg(0.5, "LeakyReLU negative slope of the guided term")
    lam: float = arg(0.1, "weight lambda of the guided term")
    std_normalize: bool = arg(False, "divide advantages by the group's std + 1e-6 (not a uniform group's)")
    mixup: str = arg("random", "which groups keep their expert row (LUFFY, RL-PLUS)", ["random", "pass"])
    mixup_ratio: float = arg(1.0, "mixup random: probability that a group keeps its expert row")
    mixup_pass_min: float = arg(0.0, "mixup pass: keep the expert if the group's pass rate >= this")
    mixup_pass_max: float = arg(1.0, "mixup pass: ... and <= this")
    solution_key: str = arg("solution", "row field holding the expert solution")
    answer_key: str = arg(None, "row field holding the ground truth; default: reward_model.ground_truth "
                                "(verl's, as the official reward reads), else answer")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward")
    dtype: str = arg("auto", "compute dtype; auto: bf16 on GPU, fp32 on CPU", ["auto", "float32", "bfloat16", "float16"])
    fused: str = arg("auto", "the fused Triton log-prob/loss op; auto: on with CUDA", ["auto", "on", "off"])
    tensorboard: bool = arg(False, "also write TensorBoard events to --output-dir")

PRESETS = {
    # Official recipe (spec: "Training step"; the official 7B script: total_epochs=1, data.shuffle=False,
    # drop_last, test_freq=5, save_freq=10): steps=None is one epoch over the data in file order.
    "paper": dict(group_size=10, prompts_per_step=480, mini_batch_prompts=120, micro_batch_size=8,
                  rollout_batch_prompts=16, lr=1e-6, weight_decay=0.01, max_grad_norm=1.0,
                  temperature=1.0, top_p=1.0, max_prompt_length=20480, max_response_length=4096,
                  clip_low=0.2, clip_high=0.2, clip_c=3.0, alpha=0.5, lam=0.1, steps=None,
                  shuffle=False, save_every=10, eval_every=5, gradient_checkpointing=True),
    # Sized for 2 CPU cores and the tiny model (the dataclass defaults are this preset).
    "demo": {},
}

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="[defaults] are the demo preset's; --preset paper sets: " +
                                ", ".join(f"{k}={'one epoch' if v is None else v}" for k, v in PRESETS["paper"].items()))
    for f in dataclasses.fields(Args):
        name, m = "--" + f.name.replace("_", "-"), f.metadata
        if f.type is bool:  # --flag / --no-flag: either can override a preset
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=m["help"])
        else:
            p.add_argument(name, type=f.type, choices=m["choices"], default=argparse.SUPPRESS, help=f"{m['help']} [{f.default}]")
    given = vars(p.parse_args(argv))  # only the flags the user typed
    preset = given.get("preset") or ("paper" if given.get("model") else "demo")
    return Args(**{**PRESETS[preset], **given, "preset": preset})  # explicit flags beat the preset

# -----------------------------------------------------------------------------
# Distributed set-up: torchrun sets RANK / WORLD_SIZE; a plain `python calibrl.py` is rank 0 of 1.

def setup_distributed():
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if torch.cuda.is_available() and local >= torch.cuda.device_count():
        raise SystemExit(f"error: local rank {local} has no GPU ({torch.cuda.device_count()} visible): start at most "
                         "one process per GPU, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on CPUs")
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ:  # under torchrun (even with one process): FSDP2 with fp32 master weights
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device

def all_sum(x):
    """Sum a float or tensor over ranks (identity on one process)."""
    t = torch.as_tensor(x, dtype=torch.float64).clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t if torch.is_tensor(x) else t.item()

def all_max(x):
    t = torch.tensor(float(x), dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()

class Policy(torch.nn.Module):
    """The model, as FSDP's root unit: everything that touches the weights (generate, log-probs, the
    loss) runs as policy(fn, *args) = fn(model, *args) inside this forward, where FSDP2 has gathered
    the root's parameters (embeddings, final norm, a tied LM head) and set up its sub-units."""
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)

def head_forward(model, batch, L, head_fn):
    """head_fn(hidden (B, T, H), targets (B, T), head weight (V, H)) on the response positions."""
    h = model.model(**batch).last_hidden_state                                   # (B, L+T, H)
    # logits at position t predict token t+1: positions L-1 .. L+T-2 score the response
    return head_fn(h[:, L - 1:-1], batch["input_ids"][:, L:], model.get_output_embeddings().weight)

def shard(policy, compute_dtype, device):
    """FSDP2: each decoder layer and vision block, the vision tower, then the root; bf16 compute
    with fp32 gradient reduction on GPUs (the parameters stay fp32 master weights)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    blocks = set(getattr(policy.model, "_no_split_modules", None) or [])
    for name, m in reversed(list(policy.model.named_modules())):  # children before their parents
        if type(m).__name__ in blocks or name.endswith("visual"):  # the vision tower: its own unit, so
            fully_shard(m, mp_policy=mp)                            # generate can run its patch embedding
    fully_shard(policy, mp_policy=mp)

@contextlib.contextmanager
def gathered(policy):
    """Rollout under FSDP2: all-gather the weights once and keep them whole while decoding, instead
    of one all-gather per layer per decoded token; reshard after."""
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

# -----------------------------------------------------------------------------
# Model and processor: transformers auto classes; VLMs get images, text-only LMs get text.

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, "data")
DEMO_MODEL = os.path.join(DATA_DIR, "tiny-qwen2.5-vl")
DEMO_TRAIN, DEMO_VAL = os.path.join(DATA_DIR, "demo", "train.jsonl"), os.path.join(DATA_DIR, "demo", "val.jsonl")

def fused_ops():
    """kernels/fused_calibrl.py, loaded by its path under a name of its own. kernels/ is no package on
    purpose: an installed distribution named `kernels` (Hugging Face's, which transformers imports when
    present) must never be shadowed by this folder, nor shadow it."""
    name = "calibrl_fused_kernels"
    if name not in sys.modules:
        import importlib.util
        spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "kernels", "fused_calibrl.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: the module must be importable by name while it runs
        spec.loader.exec_module(module)
    return sys.modules[name]

def load_processor(path, config):
    import transformers
    from transformers import AutoProcessor, AutoTokenizer
    if not hasattr(config, "vision_config"):  # text-only LM
        return AutoTokenizer.from_pretrained(path)
    try:
        proc = AutoProcessor.from_pretrained(path)
        if hasattr(proc, "image_processor"):
            return proc
    except (ImportError, ValueError, OSError, AttributeError):
        pass
    # Without torchvision, Qwen2-VL-family processors fail on their video processor. The same class
    # with an __init__ that takes no video processor handles images identically; it keeps the base
    # class's name so its saved processor_config.json loads as the real one where torchvision exists.
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    base = getattr(transformers, PROCESSOR_MAPPING_NAMES[config.model_type])
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kw):
        base.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kw)
    return type(base.__name__, (base,), {"__init__": __init__}).from_pretrained(path)

def load_model(path, dtype, device):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    try:
        config = AutoConfig.from_pretrained(path)
        is_vlm = hasattr(config, "vision_config")
        cls = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
        model = cls.from_pretrained(path, dtype=dtype).to(device)
        processor = load_processor(path, config)
    except (OSError, ValueError, KeyError) as e:  # a missing folder, no hub access, an unknown model type
        raise SystemExit(f"error: model {path}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:300]})")
    tok = getattr(processor, "tokenizer", processor)
    if tok.chat_template is None and getattr(processor, "chat_template", None) is None:
        raise SystemExit(f"error: model {path}: its tokenizer/processor has no chat template")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")  # generation stops at the end of the turn
    tok.eos_id = im_end if isinstance(im_end, int) and im_end != tok.unk_token_id else tok.eos_token_id
    tok.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_id
    shipped = model.generation_config
    extra = shipped.eos_token_id  # e.g. Qwen's <|endoftext|> also ends a response
    tok.stop_ids = sorted({tok.eos_id, *(extra if isinstance(extra, list) else [extra] if extra is not None else [])})
    # Untrained models sample <|image_pad|> and the like, which the next forward cannot take; these ids are
    # suppressed at sampling AND in every log-prob (token_logprobs), so pi_old is the sampler's distribution.
    cfg = model.config
    tok.suppress_ids = sorted({i for i in (getattr(cfg, k, None) for k in (
        "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id"))
        if isinstance(i, int)})
    # generate() fills every field our GenerationConfig leaves unset from the model folder's own
    # generation_config.json (Qwen2.5-VL-Instruct: repetition_penalty 1.05, top_k 1, top_p 0.001,
    # temperature 0.1): rollouts would no longer come from softmax(logits / T). Keep only the token ids;
    # checkpoints write the shipped file back (save_checkpoint).
    from transformers import GenerationConfig
    model.generation_config = GenerationConfig(bos_token_id=shipped.bos_token_id, eos_token_id=tok.stop_ids,
                                               pad_token_id=tok.pad_id)
    model.shipped_generation_config = shipped
    return model, processor, tok, is_vlm

# -----------------------------------------------------------------------------
# Data: .parquet or .jsonl rows -> examples {messages, images, answer, solution}.

INSTRUCTION = ("You FIRST think about the reasoning process as an internal monologue and then provide the "
               "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final "
               "answer MUST BE put in <answer> </answer> tags.")

class BadRow(Exception):
    """A row problem: (field, reason)."""

def read_rows(path):
    """-> [(row number from 1 in file order, row dict or BadRow)]; a bad file ends the run at once."""
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
                    try:
                        rows.append((n, json.loads(line))) if line.strip() else None
                    except json.JSONDecodeError as e:
                        rows.append((n, BadRow("json", f"invalid JSON ({e.msg} at column {e.colno})")))
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

def to_example(row, args, base_dir):
    """A row of the schema (README) -> {messages, images, answer, solution}; raises BadRow."""
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
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "content" in m for m in prompt):
        raise BadRow("prompt", "neither a string nor a list of chat messages {role, content}")
    messages = [{"role": m.get("role", "user"), "content": to_parts(m["content"]) if isinstance(m["content"], str)
                 else list(m["content"])} for m in prompt]
    placeholders = sum(p.get("type") == "image" for m in messages for p in m["content"])
    if placeholders and placeholders != len(images):
        raise BadRow("prompt", f"{placeholders} <image> placeholders for {len(images)} images")
    if images and not placeholders:  # images without placeholders go before the first user text
        user = next(m for m in messages if m["role"] == "user")
        user["content"] = [{"type": "image"} for _ in images] + user["content"]
    texts = [p for m in messages if m["role"] == "user" for p in m["content"] if p.get("type") == "text"]
    squash = lambda text: re.sub(r"\s+", "", text)
    given = squash("".join(p.get("text", "") for m in messages for p in m["content"]))
    if texts and squash(INSTRUCTION) not in given:  # spec: the instruction follows the question, once
        texts[-1]["text"] = texts[-1]["text"].rstrip() + " " + INSTRUCTION
    refs = []
    for k, im in enumerate(images):
        if isinstance(im, dict) and im.get("bytes") is not None:
            refs.append({"bytes": im["bytes"]})
        elif isinstance(im, (str, dict)) and (im if isinstance(im, str) else im.get("path")):
            refs.append({"path": os.path.join(base_dir, im if isinstance(im, str) else im["path"])})
        else:
            raise BadRow(f"images[{k}]", "neither a path nor a {bytes} / {path} dict")
    answer, key = row.get(args.answer_key), args.answer_key
    if args.answer_key is None:  # verl's field wins over `answer`: the official reward reads only it
        verl = row.get("reward_model")
        answer, key = (verl.get("ground_truth"), "reward_model.ground_truth") if isinstance(verl, dict) else (None, "")
        if answer is None:
            answer, key = row.get("answer"), "answer"
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or str(answer).strip() == "":
        raise BadRow(key or "answer", "missing or empty (neither reward_model.ground_truth nor answer)")
    solution = row.get(args.solution_key)
    if isinstance(solution, (list, tuple)):
        solution = solution[0] if solution else None
    if isinstance(solution, dict):
        solution = solution.get("content")
    if solution is not None and not isinstance(solution, str):
        raise BadRow(args.solution_key, f"not a string, list or message ({type(solution).__name__})")
    if isinstance(row.get("pass_ratio"), (int, float)) and row["pass_ratio"] <= 0:  # official format: no expert
        solution = None
    return dict(messages=messages, images=refs, answer=str(answer), solution=solution or None)

def open_image(ref):
    from PIL import Image
    im = Image.open(io.BytesIO(ref["bytes"]) if ref.get("bytes") is not None else ref["path"])
    return im.convert("RGB")

def load_examples(path, args, processor, tok, is_vlm, say=print, train=True):
    """Read and check every row before the first step: with bad rows, one message naming the file,
    each row and field, then exit 1 (nothing has run yet); with --skip-bad-rows, train on the rest.
    The expert's rules (a solution under LUFFY / RL-PLUS, its length) apply to training rows only."""
    base, good, bad, no_expert = os.path.dirname(os.path.abspath(path)), [], [], 0
    for n, row in read_rows(path):
        try:
            if isinstance(row, BadRow):
                raise row
            if not train and isinstance(row, dict):  # validation rows have no expert
                row = {**row, args.solution_key: None}
            ex = to_example(row, args, base)
            if ex["images"] and not is_vlm:
                raise BadRow("images", "the model is text-only and takes no images")
            for k, ref in enumerate(ex["images"]):
                try:
                    open_image(ref)
                except Exception as e:
                    raise BadRow(f"images[{k}]", f"cannot be read as an image ({type(e).__name__}: {e})"[:200])
            n_prompt = encode_prompt(processor, ex, is_vlm)["input_ids"].shape[1]
            if n_prompt > args.max_prompt_length:
                raise BadRow("prompt", f"{n_prompt} tokens > --max-prompt-length {args.max_prompt_length}")
            if train and ex["solution"] is None and args.algo in ("luffy", "rlplus"):
                raise BadRow(args.solution_key, f"missing: --algo {args.algo} needs an expert solution")
            if ex["solution"] is not None:
                n_sol = len(tok(ex["solution"], add_special_tokens=False)["input_ids"]) + 1
                if n_sol > args.max_response_length:
                    raise BadRow(args.solution_key, f"{n_sol} tokens > --max-response-length {args.max_response_length}")
            no_expert += ex["solution"] is None
            good.append(ex)
        except BadRow as e:
            bad.append(f"row {n}, field '{e.args[0]}': {e.args[1]}")
    if bad and not args.skip_bad_rows:
        more = f"\n  ... and {len(bad) - 20} more bad rows" if len(bad) > 20 else ""
        raise SystemExit(f"error: data file {path} has {len(bad)} bad rows (fix them, or pass --skip-bad-rows "
                         f"to train on the rest):\n  " + "\n  ".join(bad[:20]) + more)
    if bad:
        say(f"warning: {path}: skipped {len(bad)} bad rows of {len(bad) + len(good)}:\n  " + "\n  ".join(bad[:20]))
    if not good:
        raise SystemExit(f"error: data file {path}: no usable rows")
    if train and no_expert and args.algo == "calibrl":  # spec decision 3: l^E = 0 for these prompts
        say(f"warning: {path}: {no_expert} of {len(good)} rows have no expert solution (l^E = 0 for them)")
    return good

class PromptStream:
    """Epochs over the data, reshuffled with the seed each epoch or in file order (shuffle=False, the
    official run). A step never spans two epochs: an epoch's last partial batch is dropped, like verl's
    drop_last, so one epoch is n // k steps. State: (epoch, pos)."""
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
# Reward (official recipe): r = acc + 0.1 * fmt; a sample passed <=> acc == 1.

ANSWER_RE = re.compile(r"<answer>\s*([^<]+?)\s*</answer>")
FORMAT_RE = re.compile(r"^<think>.*?</think>.*?<answer>.*?</answer>$", re.DOTALL)
UNIT_RE = re.compile(r"(?<=\d)(?:cm²|cm|minutes|meters|a\.m\.|p\.m\.|\\%|%)")

def normalize_answer(s):
    s = s.replace("dfrac", "frac")
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)  # as the official code: the first } closes \text{
    s = re.sub(r"\s+", "", s)
    s = s.replace("\\varnothing", "\\emptyset")
    s = UNIT_RE.sub("", s)  # units and percent signs that follow a number
    return re.sub(r"\\degree|degrees|°", r"^\\circ", s)

def math_equal(pred, gt):
    from math_verify import parse, verify  # timeouts off: the Verifier below bounds each check
    wrap = lambda s: s if "\\boxed" in s else "\\boxed{" + s + "}"
    gold = parse(wrap(gt), parsing_timeout=None)
    letters = str(gold[1]) if len(gold) > 1 else ""
    if letters and letters in "ABCDEFGHIJK":  # multiple choice (official: a run of letters A-K)
        return float(wrap(pred).split("\\boxed{", 1)[1].startswith(letters))  # departure 12
    guess = parse(wrap(pred), parsing_timeout=None)
    # the official argument order: the prediction in math-verify's `gold` slot (verify is asymmetric:
    # official "x >= 1" vs "[1, oo)" scores 1, the reverse 0)
    return float(bool(guess) and verify(guess, gold, timeout_seconds=None))

def _verify_worker(conn, parent_end):
    import logging
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it warns that its timeouts are off
    parent_end.close()  # so that recv() ends (EOFError) when the trainer exits
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the trainer's handlers: terminate() must work,
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # and Ctrl-C is the trainer's to handle
    while True:
        pred, gt = conn.recv()
        try:
            conn.send((math_equal(pred, gt), 0))
        except Exception:
            conn.send((0.0, 1))

class Verifier:
    """math_equal in a worker process, so that a pathological answer (a huge exponent, deep nesting)
    that hangs sympy inside C code can be killed: a check is bounded by `timeout` seconds. A check
    that times out or raises scores 0 and is counted in `failures`."""
    timeout, proc, failures = 5.0, None, 0

    def __call__(self, pred, gt):
        import multiprocessing as mp
        if self.proc is None:
            ctx = mp.get_context("fork")  # the child only runs sympy: no torch, no CUDA
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_verify_worker, args=(child, self.conn), daemon=True)
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

VERIFY = Verifier()

def reward_fn(response, ground_truth):
    """-> (accuracy, format) in {0,1}^2; never raises."""
    fmt = float(FORMAT_RE.fullmatch(response) is not None)
    m = ANSWER_RE.search(response)
    if m is None:
        return 0.0, fmt
    try:
        pred, gt = normalize_answer(m.group(1)), normalize_answer(str(ground_truth))
        return (1.0 if pred == gt else VERIFY(pred, gt)), fmt
    except Exception:
        return 0.0, fmt

# -----------------------------------------------------------------------------
# Rollout: G sampled responses per prompt; the expert solution joins the group as row G+1.

def encode_prompt(processor, ex, is_vlm):
    """One prompt -> {input_ids (1, L), attention_mask (1, L), [mm_token_type_ids, pixel_values, image_grid_thw]}."""
    msgs = ex["messages"]
    if not is_vlm:  # text-only chat templates take plain strings
        msgs = [{"role": m["role"], "content": "".join(p.get("text", "") for p in m["content"])} for m in msgs]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if is_vlm:
        images = [open_image(r) for r in ex["images"]]
        return dict(processor(text=[text], images=images or None, return_tensors="pt"))
    return dict(processor([text], return_tensors="pt", add_special_tokens=False))

def collate(encs, responses, pad_id, device):
    """Left-pad prompts to L, right-pad responses to T: the response of every row starts at column L.
    encs: one prompt encoding per row; responses: one (T_i,) LongTensor per row, or None."""
    L = max(e["input_ids"].shape[1] for e in encs)
    T = max(len(r) for r in responses) if responses else 0
    B = len(encs)
    ids = torch.full((B, L + T), pad_id, dtype=torch.long)   # (B, L+T)
    attn = torch.zeros(B, L + T, dtype=torch.long)            # (B, L+T)
    mm = torch.zeros(B, L + T, dtype=torch.long)              # (B, L+T) 1 on image tokens
    for i, e in enumerate(encs):
        n = e["input_ids"].shape[1]
        ids[i, L - n:L], attn[i, L - n:L] = e["input_ids"][0], e["attention_mask"][0]
        if "mm_token_type_ids" in e:
            mm[i, L - n:L] = e["mm_token_type_ids"][0]
        if responses:
            ids[i, L:L + len(responses[i])], attn[i, L:L + len(responses[i])] = responses[i], 1
    batch = dict(input_ids=ids, attention_mask=attn)
    if "mm_token_type_ids" in encs[0]:
        batch["mm_token_type_ids"] = mm
    if any("pixel_values" in e for e in encs):  # images of every row, in row order
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in encs if "pixel_values" in e])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in encs if "image_grid_thw" in e])
    return {k: v.to(device) for k, v in batch.items()}, L

def sampling_config(args, tok, n, greedy=False):
    """The sampler: softmax(logits / T) over all ids but tok.suppress_ids (top-p if < 1), or greedy.
    Every field that shapes the distribution is set here (load_model cleared the model's defaults);
    top_k=0 switches transformers' default top-k of 50 off."""
    from transformers import GenerationConfig
    return GenerationConfig(do_sample=not greedy, temperature=None if greedy else args.temperature,
                            top_p=None if greedy else args.top_p, top_k=None if greedy else 0,
                            repetition_penalty=1.0, max_new_tokens=args.max_response_length,
                            num_return_sequences=n, eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id,
                            suppress_tokens=tok.suppress_ids or None)

@torch.no_grad()
def generate(policy, tok, encs, n, args, device, greedy=False):
    """n responses per prompt -> list (len(encs) * n) of (T_i,) LongTensors ending in eos unless truncated."""
    gen = sampling_config(args, tok, n, greedy)
    out = []
    for i in range(0, len(encs), args.rollout_batch_prompts):
        batch, L = collate(encs[i:i + args.rollout_batch_prompts], None, tok.pad_id, device)
        seqs = policy(lambda m: m.generate(**batch, generation_config=gen, synced_gpus=torch.distributed.is_initialized()))
        for s in seqs[:, L:].cpu():  # (B*n, T_gen): cut after the first stop token (else: truncated)
            end = torch.isin(s, torch.tensor(tok.stop_ids)).nonzero()
            out.append(s[: end[0, 0] + 1] if len(end) else s)
    return out

def rollout(policy, tok, examples, encs, args, device):
    """-> rows: list of dicts(prompt, resp (T_i,), expert, reward, acc, fmt); G on-policy rows then
    (unless grpo, and when the prompt has a solution) its expert row, for every prompt."""
    G = args.group_size
    samples = generate(policy, tok, encs, G, args, device)
    rows = []
    for p, ex in enumerate(examples):
        group = [dict(prompt=p, resp=samples[p * G + g], expert=False) for g in range(G)]
        if args.algo != "grpo" and ex["solution"] is not None:  # expert = solution + end-of-turn
            ids = tok(ex["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_id]
            group.append(dict(prompt=p, resp=torch.tensor(ids[: args.max_response_length]), expert=True))
        for r in group:
            text = tok.decode(r["resp"], skip_special_tokens=True)
            r["acc"], r["fmt"] = reward_fn(text, ex["answer"])
            r["reward"] = r["acc"] + 0.1 * r["fmt"]
        rows += group
    return rows

# -----------------------------------------------------------------------------
# Log-probs: one function scores response tokens for pi_old, the expert baseline and the update.

def token_logprobs(logits, targets, temperature=1.0, suppress_ids=None):
    """Readable reference (the fused kernel is tested against it).
    logits (..., V) any float dtype, targets (...) -> fp32 log pi(target) and entropy, both (...).
    suppress_ids: ids the sampler never produces; their logits count as -inf (a large finite
    negative, so that p * log p stays 0 there)."""
    logits = logits.float() / temperature                                        # (..., V) fp32
    if suppress_ids:
        logits = logits.index_fill(-1, torch.as_tensor(suppress_ids, device=logits.device), -1e30)
    logp_all = torch.log_softmax(logits, dim=-1)                                 # (..., V)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)                # (...)
    entropy = -(logp_all.exp() * logp_all).sum(-1)                               # (...)
    return logp, entropy

def response_logprobs(policy, encs, resps, args, device, pad_id):
    """-> logp, entropy (B, T) fp32 of the response tokens under the current weights.
    Only response positions reach the LM head (prompt and image tokens never do)."""
    batch, L = collate(encs, resps, pad_id, device)
    def head_fn(hidden, targets, weight):                                        # (B, T, H), (B, T), (V, H)
        if args.fused_on:
            fused_logprobs = fused_ops().fused_logprobs
            B, T, H = hidden.shape
            logp, ent = fused_logprobs(hidden.reshape(B * T, H), weight, targets.reshape(-1), args.temperature)
            return logp.view(B, T), ent.view(B, T)
        return token_logprobs(hidden @ weight.T, targets, args.temperature, args.suppress_ids)  # (B, T, V)
    return policy(head_forward, batch, L, head_fn)

# -----------------------------------------------------------------------------
# Advantages (Eq. A): A_i = r_i - mean of the group's on-policy rewards (expert excluded).

def group_advantages(rewards, group_size, std_normalize=False, eps=1e-6, expert_rewards=None):
    """rewards (P*G,) on-policy rows only, contiguous groups -> A (P*G,);
    with expert_rewards (P,) also A_E = r_E - mu (P,), used by LUFFY and RL-PLUS."""
    r = rewards.view(-1, group_size)                                             # (P, G)
    # mu = r_1 + mean(r - r_1): exact for a uniform group (A = 0 exactly, A_E = r_E - r exactly),
    # where r.mean() can round (eight rewards of 0.1 would give A = -7.45e-9 in float32)
    d = r - r[:, :1]                                                             # (P, G)
    mu = r[:, :1] + d.mean(1, keepdim=True)                                      # (P, 1)
    adv = d - d.mean(1, keepdim=True)
    scale = torch.ones_like(mu)
    if std_normalize and group_size > 1:  # unbiased std; a group with no spread is left unscaled
        std = d.std(1, keepdim=True)
        scale = torch.where(std > 0, std + eps, torch.ones_like(std))
    if group_size == 1:  # decision 5: a lone rollout has no baseline to beat
        adv = torch.zeros_like(adv)
    adv = (adv / scale).reshape(-1)
    if expert_rewards is None:
        return adv
    return adv, ((expert_rewards.view(-1, 1) - mu) / scale).view(-1)  # A_E = r_E - mu

# -----------------------------------------------------------------------------
# Loss (Eq. C) and the baselines, per token, token-mean over the counted rows.

def policy_loss(logp, old_logp, advantages, mask, *, algo="calibrl", expert_logp=None, passed=None,
                expert_rows=None, clip_low=0.2, clip_high=0.2, clip_c=3.0, alpha=0.5, lam=0.1, num_tokens=None):
    """logp/old_logp/expert_logp/mask (R, T); advantages/passed/expert_rows (R,).
    expert_logp is each row's baseline l^E, already broadcast; on an expert row, old_logp is pi_old(e_t).
    Returns (sum of per-token losses over valid tokens of counted rows) / (num_tokens or own count)."""
    R, T = logp.shape
    mask = mask.to(logp.dtype)
    is_exp = torch.zeros(R, dtype=torch.bool, device=logp.device) if expert_rows is None else expert_rows.bool()
    on = mask * (~is_exp)[:, None]                                               # (R, T) on-policy tokens
    A = advantages.to(logp.dtype)[:, None]                                       # (R, 1)
    log_ratio = torch.where(mask > 0, logp - old_logp, torch.zeros_like(logp))  # 0 on padding: no inf/nan
    rho = log_ratio.exp()                                                        # (R, T)
    # Eq. C, dual-clip PPO: max(-A rho, -A clip(rho)); for A < 0 also capped at -A c
    pg1, pg2 = -A * rho, -A * rho.clamp(1 - clip_low, 1 + clip_high)
    ppo = torch.maximum(pg1, pg2)
    ppo = torch.where(A < 0, torch.minimum(ppo, -A * clip_c), ppo)
    per_tok = ppo * on
    g = torch.zeros_like(logp)
    if algo == "calibrl":
        # Eq. C, guided term: g = |A| * LeakyReLU_alpha(-s (log pi - l^E)), s = +1 passed, -1 failed
        s = passed.to(logp.dtype)[:, None] * 2 - 1                               # (R, 1)
        base = expert_logp if expert_logp is not None else torch.zeros_like(logp)
        g = A.abs() * F.leaky_relu(-s * (logp - base), alpha)
        per_tok = per_tok + lam * g * on                                         # expert rows: excluded
    elif algo in ("luffy", "rlplus"):
        p = torch.where(mask > 0, logp, torch.zeros_like(logp)).exp()            # pi_theta(e_t)
        if algo == "luffy":  # shaped off-policy term: -A_E f(p), f(p) = p / (p + 0.1); no ratio, no clip
            off = -A * p / (p + 0.1)
        else:  # RL-PLUS: -A_E w sg[(1 - p)^0.5], w = 2p / (pi_old + (pi_old + 1) / 2)
            p_old = torch.where(mask > 0, old_logp, torch.zeros_like(logp)).exp()
            off = -A * (2 * p / (p_old + 0.5 * (p_old + 1))) * (1 - p).clamp(min=0).sqrt().detach()
        per_tok = per_tok + off * mask * is_exp[:, None]
    elif algo != "grpo":
        raise ValueError(f"unknown algo {algo!r}")
    counted = on if algo in ("calibrl", "grpo") else mask
    own = counted.sum()
    loss = (per_tok * counted).sum() / (num_tokens if num_tokens is not None else own.clamp(min=1))
    with torch.no_grad():
        n = on.sum().clamp(min=1)
        metrics = {"loss/clipfrac": ((pg2 > pg1).float() * on).sum() / n,
                   "loss/dualclip_frac": (((A < 0) & (torch.maximum(pg1, pg2) > -A * clip_c)).float() * on).sum() / n,
                   "loss/ratio": (rho * on).sum() / n,
                   "loss/ratio_max_dev": ((rho - 1).abs() * on).max(),
                   "loss/ppo": (ppo * on).sum() / n,
                   "loss/guided": (g * on).sum() / n,
                   "loss/approx_kl": (-log_ratio * on).sum() / n,
                   "tokens": own}
    return loss, metrics

# -----------------------------------------------------------------------------
# Update: pi_old pass, then mini-batches of whole groups, micro-batches with gradient accumulation.

def micro_batches(items, size):
    """Chunks of `size`; under torchrun every rank runs the same number of forwards (FSDP's
    collectives must pair up), so a rank with fewer items repeats one with weight 0."""
    n = math.ceil(len(items) / size)
    n_all = int(all_max(n))
    chunks = [(items[i * size:(i + 1) * size], 1.0) for i in range(n)]
    return chunks + [(chunks[0][0] if chunks else [], 0.0)] * (n_all - n)

def pad_rows(vectors, T):
    """list of 1-D tensors -> (len, T), zero-padded."""
    out = torch.zeros(len(vectors), T, dtype=vectors[0].dtype)
    for i, v in enumerate(vectors):
        out[i, :min(len(v), T)] = v[:T]
    return out

@torch.no_grad()
def score_rows(policy, encs, rows, args, device, pad_id, dummy):
    """pi_old log-probs and entropy of every row (on-policy and expert), at the rollout temperature."""
    for chunk, w in micro_batches(rows, args.micro_batch_size):
        chunk = chunk or [dummy]
        logp, ent = response_logprobs(policy, [encs[r["prompt"]] for r in chunk], [r["resp"] for r in chunk], args, device, pad_id)
        for r, lp, en in zip(chunk, logp.cpu(), ent.cpu()):
            if w:
                r["old_logp"], r["entropy"] = lp[:len(r["resp"])], en[:len(r["resp"])]

def attach_advantages(rows, args):
    """Eq. A per group; l^E (Eq. B) broadcast to the group; mixup decides LUFFY / RL-PLUS expert rows."""
    G = args.group_size
    groups = [rows[i:j] for i, j in group_bounds(rows)]
    for grp in groups:
        on, exp = grp[:G], (grp[G] if len(grp) > G else None)
        r_on = torch.tensor([r["reward"] for r in on], dtype=torch.float64)
        r_exp = torch.tensor([exp["reward"] if exp else 0.0], dtype=torch.float64)
        adv, adv_e = group_advantages(r_on, G, args.std_normalize, expert_rewards=r_exp)
        for r, a in zip(on, adv.tolist()):
            r["adv"], r["passed"] = a, r["acc"] == 1.0           # passed from accuracy, never from a float reward
            r["base"] = exp["old_logp"] if exp else torch.zeros(0)  # Eq. B: l^E, aligned by position
        if exp:
            pass_rate = sum(r["passed"] for r in on) / G
            keep = (torch.rand(()).item() < args.mixup_ratio if args.mixup == "random"
                    else args.mixup_pass_min <= pass_rate <= args.mixup_pass_max)
            exp.update(adv=adv_e.item(), passed=exp["acc"] == 1.0, base=exp["old_logp"],
                       in_loss=keep and args.algo in ("luffy", "rlplus"))  # CalibRL: never in the loss
        for r in on:
            r["in_loss"] = True
    return groups

def group_bounds(rows):
    starts = [i for i, r in enumerate(rows) if i == 0 or r["prompt"] != rows[i - 1]["prompt"]]
    return list(zip(starts, starts[1:] + [len(rows)]))

def update(policy, opt, sched, encs, groups, args, device, pad_id, world):
    """One PPO epoch (or more) over the step's rollouts; returns the metrics of the update."""
    stats, first_dev, dummy = {}, 0.0, groups[0][0]
    P = len(groups)
    mb = args.mini_batch_prompts // world                       # prompts per mini-batch on this rank
    for epoch in range(args.ppo_epochs):
        for m0 in range(0, P, mb):
            rows = [r for grp in groups[m0:m0 + mb] for r in grp if r["in_loss"]]
            num_tokens = all_sum(sum(len(r["resp"]) for r in rows))   # decision 2: whole mini-batch, all ranks
            live = [r for r in rows if r["adv"] != 0.0]                # departure 8: A = 0 rows add exactly 0
            for chunk, w in micro_batches(live, args.micro_batch_size):
                chunk = chunk or [dummy]
                T = max(len(r["resp"]) for r in chunk)
                mask = pad_rows([torch.ones(len(r["resp"])) for r in chunk], T).to(device)  # (B, T)
                old = pad_rows([r["old_logp"] for r in chunk], T).to(device)              # (B, T)
                base = pad_rows([r["base"] for r in chunk], T).to(device)                 # (B, T) l^E, 0 past the expert
                adv = torch.tensor([r["adv"] for r in chunk], device=device)               # (B,)
                passed = torch.tensor([r["passed"] for r in chunk], device=device)
                is_exp = torch.tensor([r["expert"] for r in chunk], device=device)
                kw = dict(algo=args.algo, expert_logp=base, passed=passed, expert_rows=is_exp,
                          clip_low=args.clip_low, clip_high=args.clip_high, clip_c=args.clip_c,
                          alpha=args.alpha, lam=args.lam, num_tokens=max(num_tokens, 1.0))
                def head_fn(hidden, targets, weight):                            # (B, T, H), (B, T), (V, H)
                    if args.fused_on:
                        return fused_ops().fused_policy_loss(hidden, weight, targets, old, mask, advantages=adv,
                                                 temperature=args.temperature, **kw)
                    logp, _ = token_logprobs(hidden @ weight.T, targets, args.temperature, args.suppress_ids)
                    return policy_loss(logp, old, adv, mask, **kw)
                batch, L = collate([encs[r["prompt"]] for r in chunk], [r["resp"] for r in chunk], pad_id, device)
                loss, m = policy(head_forward, batch, L, head_fn)
                # gradients are averaged over ranks; the loss is already a global token-mean: undo it
                (loss * w * world).backward()
                n = m.pop("tokens").item() * w
                for k, v in m.items():
                    add(stats, k, v.item(), n)
                if epoch == 0 and m0 == 0 and w:  # self-check: theta == theta_old before the first step
                    first_dev = max(first_dev, m["loss/ratio_max_dev"].item())
            grad_norm = clip_grad_norm(policy, args.max_grad_norm)
            if math.isfinite(grad_norm):
                opt.step()
                sched.step()
            add(stats, "loss/skipped_frac", float(not math.isfinite(grad_norm)))  # non-finite: step skipped
            add(stats, "loss/grad_norm", grad_norm if math.isfinite(grad_norm) else 0.0, 1)
            opt.zero_grad(set_to_none=True)
    stats.pop("loss/ratio_max_dev", None)
    return stats, all_max(first_dev)

def add(stats, key, value, n=1):
    """stats[key] = [sum of value * n, sum of n]: a weighted mean, reduced over ranks when logged."""
    s = stats.setdefault(key, [0.0, 0.0])
    s[0], s[1] = s[0] + value * n, s[1] + n

def clip_grad_norm(model, max_norm):
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

# -----------------------------------------------------------------------------
# Evaluation: k samples at the training temperature + greedy, on a random stream of its own.

EVAL_KEYS = ("eval/accuracy", "eval/pass@k", "eval/format", "eval/response_length", "eval/greedy_accuracy",
             "eval/greedy_reward")

@torch.no_grad()
def evaluate(policy, tok, processor, examples, args, device, is_vlm, rank, world, rollout_ctx):
    examples = examples[: args.eval_max_prompts or None]
    mine, k, rb = examples[rank::world], args.eval_samples, args.rollout_batch_prompts
    stats = {key: [0.0, 0.0] for key in EVAL_KEYS}  # every rank reports every key (reduce_stats)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), rollout_ctx():  # the training stream is left as it was
        torch.manual_seed(10_000 + args.seed + rank)
        for b in range(int(all_max(math.ceil(len(mine) / rb)))):  # the same number of generate calls on
            exs = mine[b * rb:(b + 1) * rb]                           # every rank: a rank with nothing left
            encs = [encode_prompt(processor, ex, is_vlm) for ex in exs or examples[:1]]  # decodes a dummy
            sampled = generate(policy, tok, encs, k, args, device)
            greedy = generate(policy, tok, encs, 1, args, device, greedy=True)
            for p, ex in enumerate(exs):
                scores = [reward_fn(tok.decode(s, skip_special_tokens=True), ex["answer"]) for s in sampled[p * k:(p + 1) * k]]
                add(stats, "eval/accuracy", sum(a for a, _ in scores) / k)
                add(stats, "eval/pass@k", float(any(a == 1.0 for a, _ in scores)))
                add(stats, "eval/format", sum(f for _, f in scores) / k)
                add(stats, "eval/response_length", sum(len(s) for s in sampled[p * k:(p + 1) * k]) / k)
                acc, fmt = reward_fn(tok.decode(greedy[p], skip_special_tokens=True), ex["answer"])
                add(stats, "eval/greedy_accuracy", acc)  # the official protocol: greedy, n = 1
                add(stats, "eval/greedy_reward", acc + 0.1 * fmt)  # what the official run logs
    return stats

# -----------------------------------------------------------------------------
# Logging and checkpoints: one line per step, metrics.jsonl always, TensorBoard on request.

def reduce_stats(stats):
    """[sum, n] per key, summed over ranks -> {key: mean}; keys with no data anywhere are dropped.
    Every rank must hold the same keys (register them with n = 0 where a rank has no data)."""
    keys = sorted(stats)
    t = all_sum(torch.tensor([v for k in keys for v in stats[k]], dtype=torch.float64)).view(-1, 2)
    return {k: s / n for k, (s, n) in zip(keys, t.tolist()) if n}

class Logger:
    def __init__(self, out_dir, rank, tensorboard, steps):
        self.rank, self.path, self.tb, self.steps, self.t0 = rank, os.path.join(out_dir, "metrics.jsonl"), None, steps, None
        if rank == 0 and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit("error: --tensorboard needs the tensorboard package (pip install tensorboard)")
            self.tb = SummaryWriter(out_dir)

    def truncate(self, step):
        """On resume: drop rows logged after the checkpoint (a run killed mid-way logged them)."""
        if self.rank == 0 and os.path.exists(self.path):
            rows = [l for l in open(self.path) if json.loads(l)["step"] <= step]
            open(self.path, "w").writelines(rows)

    def log(self, step, metrics):
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if "train/reward" in metrics:
            m = metrics
            self.t0 = self.t0 or (time.time() - m["time/step"], step - 1)  # progress: step/total and ETA
            eta = (time.time() - self.t0[0]) / (step - self.t0[1]) * (self.steps - step)
            print(f"step {step}/{self.steps} eta {eta / 60:.1f}m | reward {m['train/reward']:.3f} acc {m['train/accuracy']:.3f} "
                  f"fmt {m['train/format']:.2f} | ent {m['train/entropy']:.3f} clip {m.get('loss/clipfrac', 0):.3f} "
                  f"guided {m.get('loss/guided', 0):.4f} | len {m['train/response_length']:.1f} | "
                  f"t {m['time/rollout']:.1f}/{m['time/logprob']:.1f}/{m['time/update']:.1f}s "
                  f"{m['perf/tokens_per_sec']:.0f} tok/s", flush=True)
        if "eval/accuracy" in metrics:
            print(f"eval {step:4d} | " + " ".join(f"{k[5:]} {metrics[k]:.3f}" for k in sorted(metrics) if k.startswith("eval/")), flush=True)

def rng_state():
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                python=random.getstate(), numpy=np.random.get_state())

def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()

def save_checkpoint(policy, processor, opt, sched, stream, step, out_dir, rank):
    """checkpoint-<step>/: the full model in save_pretrained layout (gathered to rank 0) and what a
    resume needs: state/ (sharded model + optimizer, torch.distributed.checkpoint), rng-<rank>.pt,
    trainer.json. Written as checkpoint-<step>.tmp and renamed only when complete."""
    import shutil
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    final = os.path.join(out_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # the remains of a run killed while saving
        os.makedirs(tmp)
    barrier()
    model_sd, optim_sd = get_state_dict(policy, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, "state"))
    torch.save(rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
    full = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        policy.model.save_pretrained(tmp, state_dict=full)
        policy.model.shipped_generation_config.save_pretrained(tmp)  # the model folder's, not the sampler's
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump(dict(step=step, epoch=stream.epoch, pos=stream.pos, sched=sched.state_dict()), f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    barrier()
    return final

def checkpoints(out_dir):
    found = [re.fullmatch(r"checkpoint-(\d+)", d) for d in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])]
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

# -----------------------------------------------------------------------------
# Main loop: rollout -> pi_old log-probs and l^E -> advantages -> update -> log / eval / save.

def main(argv=None):
    import warnings
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in one process: fine
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    torch.manual_seed(args.seed * 1000 + rank)  # the training stream: sampling and mixup, per rank
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if args.fused == "auto":
        import importlib.util
        args.fused_on = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    else:
        args.fused_on = args.fused == "on"
    if args.model is None and not os.path.exists(DEMO_MODEL):
        say("building the demo model and data (data/make_demo.py) ...")
        import subprocess
        subprocess.run([sys.executable, os.path.join(DATA_DIR, "make_demo.py")], check=True)
    model_path = args.model or DEMO_MODEL
    if args.data is None:
        args.data, args.eval_data = DEMO_TRAIN, args.eval_data or DEMO_VAL
        if args.model:
            say(f"notice: no --data given; training {args.model} on the bundled demo data {args.data}")

    # under FSDP the parameters are fp32 master weights and compute runs in `dtype`
    distributed = torch.distributed.is_initialized()
    model, processor, tok, is_vlm = load_model(model_path, torch.float32 if distributed else dtype, device)
    args.suppress_ids = tok.suppress_ids
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = Policy(model)
    if distributed:
        shard(policy, dtype, device)
    rollout_ctx = (lambda: gathered(policy)) if distributed else contextlib.nullcontext
    eval_set = load_examples(args.eval_data, args, processor, tok, is_vlm, say, train=False) if args.eval_data else []
    run_eval = lambda: reduce_stats(evaluate(policy, tok, processor, eval_set, args, device, is_vlm, rank, world, rollout_ctx))

    out_dir = args.output_dir or os.path.join("runs", f"{args.algo}-{time.strftime('%Y%m%d-%H%M%S')}")
    if distributed:  # every rank uses rank 0's folder name
        box = [out_dir]
        torch.distributed.broadcast_object_list(box)
        out_dir = box[0]
    if checkpoints(out_dir) and not (args.resume or args.overwrite or args.eval_only):
        raise SystemExit(f"error: {out_dir} holds checkpoints of another run; pass --resume to continue "
                         "it or --overwrite to start afresh")
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        if args.overwrite and not args.resume:
            import shutil
            for _, d in checkpoints(out_dir):
                shutil.rmtree(d)
            open(os.path.join(out_dir, "metrics.jsonl"), "w").close()
    barrier()
    logger = Logger(out_dir, rank, args.tensorboard, args.steps)
    if args.eval_only:
        logger.log(0, run_eval())
        return out_dir

    data = load_examples(args.data, args, processor, tok, is_vlm, say)
    if len(data) < args.prompts_per_step:
        raise SystemExit(f"error: data file {args.data}: {len(data)} usable rows, fewer than one step's "
                         f"--prompts-per-step {args.prompts_per_step}")
    if args.steps is None:  # one epoch, the last partial step dropped (the official run)
        args.steps = logger.steps = len(data) // args.prompts_per_step
    # before any forward: after one, FSDP2's root holds unsharded parameters the optimizer must not keep
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1)))
    stream = PromptStream(len(data), args.seed, args.shuffle)
    assert args.prompts_per_step % world == 0 and args.mini_batch_prompts % world == 0, \
        "--prompts-per-step and --mini-batch-prompts must be multiples of the number of ranks"
    start = 0
    if args.resume and checkpoints(out_dir):
        path = checkpoints(out_dir)[-1][1]
        start = load_checkpoint(policy, opt, sched, stream, path, rank)
        logger.truncate(start)
        say(f"resuming from {path} (step {start})")
    say(f"calibrl | algo {args.algo} | preset {args.preset} | model {model_path} | "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | "
        f"{len(data)} train rows | world {world} | device {device} {dtype} | fused {args.fused_on} | out {out_dir}")
    stop = []  # SIGTERM / SIGINT: finish the step, write a checkpoint, exit 0
    handlers = {sig: signal.signal(sig, lambda *_: stop.append(1)) for sig in (signal.SIGTERM, signal.SIGINT)}
    if eval_set and args.eval_every and start == 0:
        logger.log(0, run_eval())

    VERIFY.timeout, bad_streak, diverged = args.reward_timeout, 0, False
    for step in range(start + 1, args.steps + 1):
        t0, failures = time.time(), VERIFY.failures
        # each rank takes a strided shard, so mini-batch k holds the same groups for any world size
        examples = [data[i] for i in stream.take(args.prompts_per_step)[rank::world]]
        encs = [encode_prompt(processor, ex, is_vlm) for ex in examples]
        model.eval()
        with rollout_ctx():
            rows = rollout(policy, tok, examples, encs, args, device)
        t1 = time.time()
        score_rows(policy, encs, rows, args, device, tok.pad_id, rows[0])
        groups = attach_advantages(rows, args)
        t2 = time.time()
        model.train()
        stats, first_dev = update(policy, opt, sched, encs, groups, args, device, tok.pad_id, world)
        t3 = time.time()

        add(stats, "train/expert_accuracy", 0.0, 0)  # a rank without expert rows still holds the key
        for r in rows:
            if not r["expert"]:
                add(stats, "train/reward", r["reward"])
                add(stats, "train/accuracy", r["acc"])
                add(stats, "train/format", r["fmt"])
                add(stats, "train/response_length", len(r["resp"]))
                add(stats, "train/entropy", r["entropy"].mean().item(), len(r["resp"]))
                add(stats, "train/zero_adv_rows", float(r["adv"] == 0.0))
            else:
                add(stats, "train/expert_accuracy", r["acc"])
        metrics = reduce_stats(stats)
        n_tokens = all_sum(sum(len(r["resp"]) for r in rows))
        metrics.update({"loss/ratio_first_dev": first_dev, "time/rollout": t1 - t0, "time/logprob": t2 - t1,
                        "time/update": t3 - t2, "time/step": t3 - t0, "perf/tokens_per_sec": n_tokens / (t3 - t0),
                        "train/lr": sched.get_last_lr()[0], "train/reward_failures": all_sum(VERIFY.failures - failures)})
        logger.log(step, metrics)
        if first_dev > 1e-3:  # the self-check: pi_theta == pi_old before the first optimizer step
            say(f"warning: step {step}: |pi_theta/pi_old - 1| = {first_dev:.1e} on the first update (log-prob paths differ?)")
        bad_streak = bad_streak + 1 if metrics["loss/skipped_frac"] > 0 else 0  # a non-finite loss or gradient
        if eval_set and args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            logger.log(step, run_eval())
        stopping = all_max(len(stop)) > 0
        diverged = bad_streak >= args.max_bad_steps
        if (args.save_every and step % args.save_every == 0) or step == args.steps or stopping or diverged:
            path = save_checkpoint(policy, processor, opt, sched, stream, step, out_dir, rank)
        if stopping:
            say(f"stopped by signal after step {step}; checkpoint {path}; continue with --resume")
        if stopping or diverged:
            break
    for sig, h in handlers.items():
        signal.signal(sig, h)
    if distributed:
        torch.distributed.destroy_process_group()
    if diverged:  # skipped steps left the weights untouched: the checkpoint holds the last good ones
        raise SystemExit(f"error: non-finite loss or gradient norm in {bad_streak} consecutive steps (up to step "
                         f"{step}); those optimizer steps were skipped and the weights are saved in {path}")
    return out_dir

if __name__ == "__main__":
    main()
