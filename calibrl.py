"""
calibrl.py -- CalibRL in one file: hybrid-policy RLVR for vision-language models.

CalibRL (ICLR 2026, "Controllable Exploration in Hybrid-Policy RLVR for Multi-Modal Reasoning") is
GRPO-style RL with verifiable rewards in which each prompt's group of G on-policy rollouts is
joined by one expert trajectory. The expert is not imitated: its token log-probs under pi_old are
a calibration baseline l^E in a LeakyReLU-gated, |advantage|-weighted extra term. The objective
is the one the official code (github.com/zhh6425/CalibRL, a verl fork) computes:
  Eq. A  A_i = r_i - mean of the group's on-policy rewards (the expert row excluded)
  Eq. B  l^E_t = log pi_old(e_t | x, e_<t): the expert's tokens under the policy that sampled
  Eq. C  per on-policy token: dual-clip PPO + lam |A| LeakyReLU_alpha(-s (log pi_theta - l^E))

Run it:
    python calibrl.py                            # the demo: a tiny Qwen2.5-VL on the CPU, ~1 minute
    python calibrl.py --algo grpo                # a baseline: grpo | luffy | rlplus
    torchrun --nproc_per_node=8 calibrl.py --model Qwen/Qwen2.5-VL-3B-Instruct --data train.parquet
    torchrun --nproc_per_node=8 calibrl.py --model OpenGVLab/InternVL3-8B-hf --data train.parquet
    python calibrl.py --eval-only --model runs/x/checkpoint-50 --eval-data val.jsonl

Shapes in the comments: P prompts of a step on this rank, G on-policy rollouts per prompt,
R rows of a micro-batch (on-policy and expert), L prompt length (left-padded), T response length
(right-padded), H hidden size, V vocabulary size, K sampled responses per eval problem, N the
response tokens of a packed micro-batch (--pack on: rows end to end, no padding; infra/packing).
Alignment: the logits at sequence position t predict token t+1, so the response tokens at positions
[L, L+T) are scored by the hidden states at positions [L-1, L+T-1).

Departures from the paper and the official code (the README explains each):
 1. l^E is 0 at and past the expert's end (official: a packing artefact right after its end).
 2. The token-mean spans the mini-batch over micro-batches and ranks (official: per micro-batch).
 3. No expert solution (or pass_ratio <= 0): l^E = 0 (official: a 2-token dummy expert).
 4. alpha and lam are flags (official: hard-coded 0.5 and 0.1).
 5. A group with one on-policy row has A = 0 (official: mean 0, std 1, so A = r).
 6. "GRPO" is the official baseline: no std, dual clip, token-mean (closer to Dr.GRPO / DAPO).
 7. Mini-batches hold whole groups (official: rows of 10, a short fifth mini-batch per step).
 8. Rows with A = 0 count in the token-mean but skip the update's forward (they add exactly 0).
 9. The expert row is the solution + end-of-turn, teacher-forced at the rollout temperature.
10. The images reach the model (the published official code drops them).
11. Vision tokens are never sampled nor scored, and nothing else shapes sampling: pi_old is
    exactly the sampler's softmax(logits / T), whatever the model folder's generation_config says.
12. Reward: cm² is dropped, a multiple-choice letter is read after the first \\boxed{, a numeric
    ground truth is a string (the official reward does none of these).
13. A uniform group has A = 0 exactly (the official float32 mean leaves ~1e-8).

The machinery that is not the algorithm lives in infra/, one concern a file, imported by name:
family (what differs per model family: Qwen2-VL and 2.5-VL, InternVL3, text LMs), distributed
(torchrun, FSDP2), sampling, engine (the rollout engine), vllm_rollout (the rollout on vLLM,
--rollout vllm), packing (micro-batches), checker (the answer checker's sandbox), dataset (rows
checked up front), rundir (lock, stop signals, exit), metrics, checkpoints, flags.
"""
import argparse
import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the fused kernels run in Triton's interpreter on a CPU; this
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before anything imports triton

# the machinery (after the switch above: transformers may import triton); one room a concern
from infra import (checker, checkpoints, dataset, distributed, engine, family,  # noqa: E402
                   flags, metrics, packing, rundir, sampling, vllm_rollout)

# -----------------------------------------------------------------------------
# Configuration: one block; every field is a --flag and its help string is the field's docstring.

def arg(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})

@dataclass
class Args:
    model: str = arg(None, "HF id or local path; default: the tiny Qwen2.5-VL in data/")
    data: str = arg(None, "training data, .parquet or .jsonl; default: the bundled demo data")
    eval_data: str = arg(None, "validation data (same schema); the demo's default: its val split")
    algo: str = arg("calibrl", "CalibRL or a baseline", ["calibrl", "grpo", "luffy", "rlplus"])
    preset: str = arg(None, "default: demo without --model, paper with it", ["demo", "paper"])
    steps: int = arg(60, "training steps (rollout, log-probs, update); paper: one epoch")
    shuffle: bool = arg(True, "reshuffle the data each epoch (--no-shuffle: file order)")
    output_dir: str = arg(None, "run folder; default runs/<algo>-<timestamp>")
    resume: bool = arg(False, "continue from the newest complete checkpoint in --output-dir")
    overwrite: bool = arg(False, "start afresh in an --output-dir that holds another run")
    skip_bad_rows: bool = arg(False, "drop malformed data rows (reported) instead of stopping")
    reward_timeout: float = arg(5.0, "seconds one answer check may take; slower ones score 0")
    reward_budget: float = arg(60.0, "seconds of answer checks a step, per rank; then strings only")
    dist_timeout: float = arg(600.0, "seconds a rank waits for its peers in a collective")
    max_bad_steps: int = arg(3, "consecutive steps with a non-finite loss or gradient that stop")
    save_every: int = arg(0, "checkpoint every N steps (0: only at the end)")
    eval_every: int = arg(10, "evaluate on --eval-data every N steps (0: never)")
    eval_only: bool = arg(False, "only evaluate --model on --eval-data and exit")
    eval_samples: int = arg(4, "K sampled responses per problem for eval/accuracy and eval/pass@k")
    eval_max_prompts: int = arg(0, "evaluate on at most this many problems (0: all)")
    seed: int = arg(0, "seed of the training stream (data order, sampling, mixup)")
    group_size: int = arg(8, "G: on-policy rollouts per prompt")
    prompts_per_step: int = arg(16, "prompts per training step, over all ranks")
    mini_batch_prompts: int = arg(16, "prompts (whole groups) per optimizer step, over all ranks")
    micro_batch_size: int = arg(64, "--pack off: rows per forward (gradient accumulation)")
    pack: str = arg("on", "pi_old pass and update: packed, no padding, each prompt (its images "
                    "included) forwarded once for its rows (rows: once per row; off: padded, the "
                    "readable path)", ["on", "rows", "off"])
    max_tokens_per_micro_batch: int = arg(8192, "--pack on/rows: tokens per forward (on: each "
                                          "prompt once, its rows' responses)")
    rollout_max_tokens: int = arg(65536, "KV positions per rollout call: prompt + G responses each")
    rollout_cuda_graph: bool = arg(False, "decode with a CUDA graph (not yet measured on a GPU)")
    rollout: str = arg("engine", "who samples: infra/engine.py, or vLLM", ["engine", "vllm"])
    vllm_gpu_memory: float = arg(0.5, "--rollout vllm: GPU memory share of vLLM's weights and KV")
    vllm_max_seqs: int = arg(256, "--rollout vllm: sequences vLLM decodes at once")
    vllm_max_batched_tokens: int = arg(16384, "--rollout vllm: tokens a vLLM step takes at most")
    ppo_epochs: int = arg(1, "passes over the step's rollouts")
    lr: float = arg(1e-4, "AdamW learning rate (constant after warm-up)")
    warmup_steps: int = arg(0, "optimizer steps of linear learning-rate warm-up")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient-norm clip")
    temperature: float = arg(1.0, "sampling temperature (also used for every log-prob)")
    top_p: float = arg(1.0, "nucleus sampling (below 1 the sampler is no longer pi_old)")
    max_prompt_length: int = arg(512, "prompt tokens at most (images included)")
    max_response_length: int = arg(48, "response tokens at most")
    clip_low: float = arg(0.2, "PPO clip epsilon below 1")
    clip_high: float = arg(0.2, "PPO clip epsilon above 1")
    clip_c: float = arg(3.0, "dual-clip constant c for A < 0")
    alpha: float = arg(0.5, "LeakyReLU negative slope of the guided term")
    lam: float = arg(0.1, "weight lambda of the guided term")
    std_normalize: bool = arg(False, "divide A by the group's std + 1e-6 (not a uniform group's)")
    mixup: str = arg("random", "which groups keep the expert (LUFFY, RL-PLUS)", ["random", "pass"])
    mixup_ratio: float = arg(1.0, "mixup random: probability that a group keeps its expert row")
    mixup_pass_min: float = arg(0.0, "mixup pass: keep the expert if the group's pass rate >= this")
    mixup_pass_max: float = arg(1.0, "mixup pass: ... and <= this")
    solution_key: str = arg("solution", "row field holding the expert solution")
    answer_key: str = arg(None, "row field of the ground truth [reward_model.ground_truth, answer]")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward")
    dtype: str = arg("auto", "compute dtype; auto: bf16 on GPU, fp32 on CPU",
                     ["auto", "float32", "bfloat16", "float16"])
    fused: str = arg("auto", "the fused Triton loss op; auto: on with CUDA", ["auto", "on", "off"])
    tensorboard: bool = arg(False, "also write TensorBoard events to --output-dir")

PRESETS = {
    # The official recipe (spec: "Training step"; the official 7B script: total_epochs=1,
    # data.shuffle=False, drop_last, test_freq=5, save_freq=10); steps=None: one epoch.
    # rollout_max_tokens: 2^20 KV positions, 36 GiB at 3B in bf16, beside ~15 GiB of gathered
    # weights and sharded state on 8 GPUs: a rollout fits an 80 GB GPU (README, "Rollout")
    "paper": dict(group_size=10, prompts_per_step=480, mini_batch_prompts=120, micro_batch_size=8,
                  rollout_max_tokens=2**20, lr=1e-6, weight_decay=0.01, max_grad_norm=1.0,
                  temperature=1.0, top_p=1.0, max_prompt_length=20480, max_response_length=4096,
                  clip_low=0.2, clip_high=0.2, clip_c=3.0, alpha=0.5, lam=0.1, steps=None,
                  shuffle=False, save_every=10, eval_every=5, gradient_checkpointing=True,
                  # >= 20,480 + 4,096, the longest row; ~30 GB a 3B update on 8 GPUs (README)
                  max_tokens_per_micro_batch=32768),
    # Sized for 2 CPU cores and the tiny model (the dataclass defaults are this preset).
    "demo": {},
}

def parse_args(argv=None):
    paper = ", ".join(f"{k}={'one epoch' if v is None else v}" for k, v in PRESETS["paper"].items())
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], epilog="[defaults] are the "
                                f"demo preset's; --preset paper sets: {paper}")
    for f in dataclasses.fields(Args):
        name, m = "--" + f.name.replace("_", "-"), f.metadata
        if f.type is bool:  # --flag / --no-flag: either one overrides a preset
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=m["help"])
        else:
            p.add_argument(name, type=f.type, choices=m["choices"], default=argparse.SUPPRESS,
                           help=f"{m['help']} [{f.default}]")
    given = vars(p.parse_args(argv))  # only the flags the user typed
    preset = given.get("preset") or ("paper" if given.get("model") else "demo")
    return Args(**{**PRESETS[preset], **given, "preset": preset})  # explicit flags beat the preset

# -----------------------------------------------------------------------------
# Model and processor: transformers' auto classes; VLMs get images, text-only LMs get text.

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEMO_MODEL = os.path.join(DATA_DIR, "tiny-qwen2.5-vl")
DEMO_TRAIN = os.path.join(DATA_DIR, "demo", "train.jsonl")
DEMO_VAL = os.path.join(DATA_DIR, "demo", "val.jsonl")

def load_model(path, dtype, device):
    """-> model, processor, tok, is_vlm. tok is the tokenizer, with the ids the loop needs:
    tok.eos_id (ends the expert's solution), tok.pad_id, tok.stop_ids (any ends a sampled
    response), tok.suppress_ids (never sampled, excluded from every log-prob: departure 11)."""
    from safetensors import SafetensorError
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                              GenerationConfig)
    try:
        config = AutoConfig.from_pretrained(path)
        is_vlm = hasattr(config, "vision_config")
        cls = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
        # safetensors only (a pickled .bin could run code), and never a folder's own code
        model = cls.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)
        packing.enable_packed_attention(model)  # SDPA that also takes packed rows (--pack on)
        processor = family.load_processor(path, config)
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # no folder or hub, a bad file
        raise SystemExit(f"error: model {path}: cannot be loaded "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:300]})")
    tok = getattr(processor, "tokenizer", processor)
    if tok.chat_template is None and getattr(processor, "chat_template", None) is None:
        raise SystemExit(f"error: model {path}: its tokenizer/processor has no chat template")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")  # a response ends with the turn
    known = isinstance(im_end, int) and im_end != tok.unk_token_id
    tok.eos_id = im_end if known else tok.eos_token_id
    tok.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_id
    shipped = model.generation_config
    extra = shipped.eos_token_id
    extra = extra if isinstance(extra, list) else [extra]
    tok.stop_ids = sorted({tok.eos_id, *(i for i in extra if i is not None)})  # Qwen: <|endoftext|>
    # An untrained model samples <|image_pad|> and the like, which the next forward cannot take.
    tok.suppress_ids = family.of(model).vision_ids(tok)
    # generate() fills every field our sampler leaves unset from the folder's generation_config.json
    # (Qwen2.5-VL-Instruct: repetition_penalty 1.05, top_k 1, top_p 0.001, temperature 0.1): keep
    # only the token ids. Checkpoints write the shipped file back.
    model.generation_config = GenerationConfig(bos_token_id=shipped.bos_token_id,
                                               eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id)
    model.shipped_generation_config = shipped
    return model, processor, tok, is_vlm

# -----------------------------------------------------------------------------
# Prompts (spec: the question, then the instruction) and their encoding.

INSTRUCTION = ("You FIRST think about the reasoning process as an internal monologue and then "
               "provide the final answer. The reasoning process MUST BE enclosed within <think> "
               "</think> tags. The final answer MUST BE put in <answer> </answer> tags.")

def with_instruction(messages):
    """Append the instruction to the last user text, once: not when any message (the system one
    included) already holds it, whitespace aside."""
    squash = lambda text: re.sub(r"\s+", "", text)
    given = squash("".join(p.get("text", "") for m in messages for p in m["content"]))
    texts = [p for m in messages if m["role"] == "user"
             for p in m["content"] if p.get("type") == "text"]
    if texts and squash(INSTRUCTION) not in given:
        texts[-1]["text"] = texts[-1]["text"].rstrip() + " " + INSTRUCTION
    return messages

def encode_prompt(processor, ex, is_vlm, pil=False):
    """One prompt -> {input_ids (1, L), attention_mask (1, L), and for a VLM mm_token_type_ids
    (1, L), pixel_values, image_grid_thw}: the chat template, then the processor. pil: the PIL
    images too, as "images" (--rollout vllm: vLLM processes them itself)."""
    msgs = ex["messages"]
    if not is_vlm:  # text-only chat templates take plain strings
        msgs = [{"role": m["role"], "content": "".join(p.get("text", "") for p in m["content"])}
                for m in msgs]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if is_vlm:
        images = [dataset.open_image(r) for r in ex["images"]]
        enc = dict(processor(text=[text], images=images or None, return_tensors="pt"))
        return {**enc, "images": images} if pil else enc
    return dict(processor([text], return_tensors="pt", add_special_tokens=False))

def load_examples(path, args, processor, tok, is_vlm, say=print, train=True):
    """The data rows as examples {messages, images, answer, solution}, each one checked before the
    first step (dataset.read_examples: one report naming the file, each bad row and field)."""
    def prepare(ex):  # the spec's prompt, and its length in tokens
        ex["messages"] = with_instruction(ex["messages"])
        return encode_prompt(processor, ex, is_vlm)["input_ids"].shape[1]
    return dataset.read_examples(path, args, tok, is_vlm, prepare, say, train)

# -----------------------------------------------------------------------------
# Reward (official recipe): r = acc + 0.1 fmt; a sample passed <=> acc == 1 (never r > 0.1 in fp32).

ANSWER_RE = re.compile(r"<answer>\s*([^<]+?)\s*</answer>")
FORMAT_RE = re.compile(r"^<think>.*?</think>.*?<answer>.*?</answer>$", re.DOTALL)
UNIT_RE = re.compile(r"(?<=\d)(?:cm²|cm|minutes|meters|a\.m\.|p\.m\.|\\%|%)")

def normalize_answer(s):
    s = s.replace("dfrac", "frac")
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)  # as the official code: the first } closes \text{
    s = re.sub(r"\s+", "", s)
    s = s.replace("\\varnothing", "\\emptyset")
    s = UNIT_RE.sub("", s)  # units and percent signs after a number (cm² too: departure 12)
    return re.sub(r"\\degree|degrees|°", r"^\\circ", s)

def math_equal(pred, gt):
    from math_verify import parse, verify  # timeouts off: checker.Verifier bounds each check
    wrap = lambda s: s if "\\boxed" in s else "\\boxed{" + s + "}"
    gold = parse(wrap(gt), parsing_timeout=None)
    letters = str(gold[1]) if len(gold) > 1 else ""
    if letters and letters in "ABCDEFGHIJK":  # multiple choice (official: a run of letters A-K)
        return float(wrap(pred).split("\\boxed{", 1)[1].startswith(letters))  # departure 12
    guess = parse(wrap(pred), parsing_timeout=None)
    # the official argument order puts the prediction in math-verify's `gold` slot; verify is not
    # symmetric ("x >= 1" against "[1, oo)" scores 1, the reverse 0)
    return float(bool(guess) and verify(guess, gold, timeout_seconds=None))

VERIFY = checker.Verifier(math_equal)  # math-verify can hang in C code: a worker bounded in time

def reward_fn(response, ground_truth):
    """-> (accuracy, format) in {0, 1}^2; never raises."""
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
# Rollout: G sampled responses per prompt; the expert's solution joins the group as row G+1.

@dataclass
class Row:
    """One response of a group, filled in as the step runs: rollout -> pi_old pass -> Eq. A."""
    resp: torch.Tensor                   # (T_i,) token ids, ending in a stop id unless truncated
    expert: bool = False                 # the expert's solution + end-of-turn (departure 9)
    acc: float = 0.0                     # reward: accuracy in {0, 1}
    fmt: float = 0.0                     # reward: format in {0, 1}
    sample_logp: torch.Tensor = None     # (T_i,) fp32 the sampler's log-prob of y_t (on-policy)
    old_logp: torch.Tensor = None        # (T_i,) fp32 log pi_old(y_t)
    entropy: torch.Tensor = None         # (T_i,) fp32 entropy of pi_old at each position
    adv: float = 0.0                     # Eq. A: A_i; on the expert row A_E = r_E - mu
    in_loss: bool = True                 # the expert row: per mixup under LUFFY / RL-PLUS only

    @property
    def reward(self):
        return self.acc + 0.1 * self.fmt

    @property
    def passed(self):  # from the accuracy, never from a float reward
        return self.acc == 1.0

@dataclass
class Group:
    """A prompt's G on-policy rows and, unless --algo grpo or it has no solution, its expert."""
    example: dict                        # {messages, images, answer, solution}
    enc: dict                            # encode_prompt(example): input_ids (1, L_p), ...
    rows: list                           # G on-policy Rows
    expert: Row = None
    expert_logp: torch.Tensor = None     # (T_E,) Eq. B: l^E, the expert's old_logp; (0,) without

    def all_rows(self):
        return self.rows + ([self.expert] if self.expert else [])

def collate(fam, encs, responses, pad_id, device):
    """One prompt encoding and one (T_i,) response (or none) per row -> model inputs and L.
    Prompts are left-padded to L, responses right-padded to T: each response starts at column L.
    fam: the model's family block (infra/family.py): its image inputs, its positions."""
    L = max(e["input_ids"].shape[1] for e in encs)
    T = max(len(r) for r in responses) if responses else 0
    R = len(encs)
    ids = torch.full((R, L + T), pad_id, dtype=torch.long)                      # (R, L+T)
    attn = torch.zeros(R, L + T, dtype=torch.long)                               # (R, L+T)
    mm = torch.zeros(R, L + T, dtype=torch.long)                                 # 1 on image tokens
    for i, e in enumerate(encs):
        n = e["input_ids"].shape[1]
        ids[i, L - n:L], attn[i, L - n:L] = e["input_ids"][0], e["attention_mask"][0]
        if "mm_token_type_ids" in e:
            mm[i, L - n:L] = e["mm_token_type_ids"][0]
        if responses:
            ids[i, L:L + len(responses[i])], attn[i, L:L + len(responses[i])] = responses[i], 1
    inputs = dict(input_ids=ids, attention_mask=attn, **fam.image_inputs(encs))  # in row order
    if "mm_token_type_ids" in encs[0]:  # without it, recomputed log-probs drift by ~1e-3
        inputs["mm_token_type_ids"] = mm
    if fam.axes == 1:  # 1-D positions count real tokens only: left padding does not shift them
        inputs["position_ids"] = (attn.cumsum(-1) - 1).clamp(min=0)              # (R, L+T)
    return {k: v.to(device) for k, v in inputs.items()}, L

def sampling_config(args, tok, n, greedy=False):
    """The sampler: n samples per prompt from softmax(logits / T) over every id but
    tok.suppress_ids (top-p when below 1), or greedy; a sample ends at a stop id or after
    --max-response-length tokens. Nothing else shapes it, whatever the model folder's
    generation_config.json holds (departure 11)."""
    return sampling.Sampling(n, args.max_response_length, args.temperature, args.top_p, greedy,
                             tok.stop_ids, tok.suppress_ids)

@torch.no_grad()
def generate(policy, tok, encs, n, args, greedy=False, interrupt=None, key="eval"):
    """n responses per prompt -> engine.Rollout: .responses [(T_i,) LongTensor] * (len(encs) * n),
    each ending in a stop id unless truncated, .logprobs the sampler's log-prob of each token,
    .stats. Call inside distributed.gathered(policy): the weights are whole while decoding.
    key: the step, or "eval": --rollout vllm seeds each request from it (infra/vllm_rollout)."""
    # memory by budget: calls of similar-length prompts, each prompt's KV once + n * T positions
    calls = engine.plan_calls([e["input_ids"].shape[1] for e in encs], n, args.max_response_length,
                              args.rollout_max_tokens)
    sp = sampling_config(args, tok, n, greedy)
    if args.rollout == "vllm":  # vLLM, its weights synced first; key (the step) seeds its samples
        return policy.vllm.generate(policy.model, encs, sp, key, interrupt)
    # the engine runs in policy's forward (FSDP2's root); a closure, so that FSDP2 does not move
    # every prompt's images to the GPU at once
    return policy(None, sampler=lambda model: engine.generate(
        model, encs, sp, calls, pad_id=tok.pad_id, interrupt=interrupt,
        cuda_graph=args.rollout_cuda_graph))

def rollout(policy, tok, examples, encs, args, step):
    """-> [Group]: G sampled responses per prompt, scored by the reward, and (unless grpo, and when
    the prompt has a solution) its expert row: the solution + end-of-turn (departure 9); and the
    rollout's metrics."""
    G = args.group_size
    out = generate(policy, tok, encs, G, args, interrupt=rundir.STOP.requested, key=step)  # a stop
    groups = []
    for p, (ex, enc) in enumerate(zip(examples, encs)):
        rows = [Row(out.responses[i], sample_logp=out.logprobs[i]) for i in range(p * G, p * G + G)]
        group = Group(ex, enc, rows)
        if args.algo != "grpo" and ex["solution"] is not None:
            ids = tok(ex["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_id]
            group.expert = Row(torch.tensor(ids[: args.max_response_length]), expert=True)
        for r in group.all_rows():
            r.acc, r.fmt = reward_fn(tok.decode(r.resp, skip_special_tokens=True), ex["answer"])
        groups.append(group)
    return groups, out.stats

# -----------------------------------------------------------------------------
# Log-probs: one scoring function for pi_old, l^E (Eq. B) and the update, so rho = 1 at first.

def token_logprobs(logits, targets, temperature=1.0, suppress_ids=None):
    """The readable reference (the fused kernel is tested against it).
    logits (..., V) any float dtype, targets (...) -> fp32 log pi(target), entropy, both (...).
    suppress_ids: ids the sampler never produces; their logits count as -inf (a large finite
    negative, so that p log p stays 0 there)."""
    logits = logits.float() / temperature                                        # (..., V) fp32
    if suppress_ids:
        logits = logits.index_fill(-1, torch.as_tensor(suppress_ids, device=logits.device), -1e30)
    logp_all = torch.log_softmax(logits, dim=-1)                                 # (..., V)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)                # (...)
    entropy = -(logp_all.exp() * logp_all).sum(-1)                               # (...)
    return logp, entropy

class Policy(torch.nn.Module):
    """The model, as FSDP2's root unit: all that touches the weights runs in this forward, around
    which FSDP2 gathers the root's own parameters (embeddings, final norm, a tied LM head).
      policy(None, sampler=fn)            -> fn(model): engine.generate's samples  (the rollout)
      policy(inputs, L)                   -> log pi, entropy (R, T) of responses  (pi_old, l^E)
      policy(inputs, L, loss=Eq. C args)  -> (loss, metrics)                      (the update)
    The last two are the one scoring function, the readable and the fused path side by side; they
    also take an packing.Pack instead of (inputs, L): the same rows packed, the same results."""
    def __init__(self, model, temperature, suppress_ids, fused):
        super().__init__()
        self.model, self.temperature, self.suppress_ids = model, temperature, suppress_ids
        self.fused = fused

    def forward(self, inputs, L=None, loss=None, sampler=None):
        if sampler is not None:  # whole weights, no collective: ranks decode at their own pace
            return sampler(self.model)
        packed = isinstance(inputs, packing.Pack)
        if packed:  # the response-scoring positions only, (N, H), (N,); pack.rows -> (R, T)
            h, targets = packing.packed_hidden(self.model, inputs), inputs.targets
            to_rows = inputs.rows
        else:
            h = self.model.model(**inputs, use_cache=False).last_hidden_state         # (R, L+T, H)
            h, targets = h[:, L - 1:-1], inputs["input_ids"][:, L:]  # position t scores token t+1
            to_rows = lambda x: x  # noqa: E731  (already (R, T))
        W = self.model.get_output_embeddings().weight                                 # (V, H)
        if self.fused:  # Triton: no (R, T, V) logits are ever held; Eq. C inside the kernel
            ops = flags.fused_ops()
            kw = dict(temperature=self.temperature, suppress_ids=self.suppress_ids)
            if loss is not None and packed:  # the kernel's flat entry: the N tokens, no padding
                return ops.fused_policy_loss_tokens(h, W, targets, **inputs.tokens(loss), **kw)
            if loss is not None:
                return ops.fused_policy_loss(h, W, targets, **loss, **kw)
            logp, entropy = ops.fused_logprobs(h, W, targets, **kw)
        else:
            logp, entropy = token_logprobs(h @ W.T, targets, self.temperature, self.suppress_ids)
        logp, entropy = to_rows(logp), to_rows(entropy)                               # (R, T)
        return (logp, entropy) if loss is None else policy_loss(logp, **loss)

def micro_batches(rows, stand_in, args, model, pad_id, device):
    """The one chooser of micro-batches for the pi_old pass and the update: (Row, Group) pairs ->
    per forward (its pairs, weight, the policy's inputs). --pack on: at most
    --max-tokens-per-micro-batch tokens packed, each prompt once and its rows' responses, a group's
    rows together unless that costs a forward (packing.packed_micro_batches); rows: each row its
    prompt + response; off: --micro-batch-size padded rows. Every
    rank runs as many forwards: dummy work scores `stand_in` with weight 0 (distributed.in_step)."""
    packed, shared = args.pack != "off", args.pack == "on"
    if packed:  # a row costs its response + its prompt, which shared rows pay once per forward
        L = {id(g): g.enc["input_ids"].shape[1] for _, g in rows}
        tokens = [len(r.resp) + (0 if shared else L[id(g)]) for r, g in rows]
        chunks = packing.packed_micro_batches(rows, tokens, [id(g) for _, g in rows],
                                              args.max_tokens_per_micro_batch,
                                              L if shared else None)
    else:
        chunks = packing.micro_batches(rows, args.micro_batch_size)
    for chunk in chunks:
        batch, w = (chunk, 1.0) if chunk else ([stand_in], 0.0)
        encs, resps = [g.enc for _, g in batch], [r.resp for r, _ in batch]
        packing.count_forward(encs, resps, packed, w, shared)  # perf/positions, pad_frac, ...
        yield batch, w, ((packing.pack_rows(model, encs, resps, shared).to(device),) if packed
                         else collate(family.of(model), encs, resps, pad_id, device))

@torch.no_grad()
def old_logprobs(policy, groups, args, device, pad_id):
    """The pi_old pass: log pi_old and the entropy of every row, on-policy and expert, in one
    no-grad pass at the rollout temperature before any weight moves."""
    rows = [(r, g) for g in groups for r in g.all_rows()]
    for batch, w, inputs in micro_batches(rows, rows[0], args, policy.model, pad_id, device):
        rundir.STOP.check()  # a stop request abandons the pass (Abandon): nothing has moved yet
        logp, entropy = policy(*inputs)                                            # (R, T) each
        for (r, _), lp, en in zip(batch if w else [], logp.cpu(), entropy.cpu()):  # dummy: none
            r.old_logp, r.entropy = lp[:len(r.resp)], en[:len(r.resp)]

# -----------------------------------------------------------------------------
# Eq. A: A_i = r_i - mu, mu the mean of the group's on-policy rewards (the expert row excluded).

def group_advantages(rewards, group_size, std_normalize=False, eps=1e-6, expert_rewards=None):
    """rewards (P*G,) of on-policy rows, contiguous groups -> A (P*G,);
    with expert_rewards (P,) also A_E = r_E - mu (P,), used by LUFFY and RL-PLUS."""
    r = rewards.view(-1, group_size)                                             # (P, G)
    # mu = r_1 + mean(r - r_1): exact for a uniform group (A = 0 exactly, A_E = r_E - r exactly),
    # where r.mean() can round (eight rewards of 0.1 would give A = -7.45e-9 in float32)
    d = r - r[:, :1]                                                             # (P, G)
    mu = r[:, :1] + d.mean(1, keepdim=True)                                      # (P, 1)
    adv = d - d.mean(1, keepdim=True)                                            # (P, G) r - mu
    scale = torch.ones_like(mu)
    if std_normalize and group_size > 1:  # unbiased std; a group with no spread is left unscaled
        std = d.std(1, keepdim=True)
        scale = torch.where(std > 0, std + eps, torch.ones_like(std))
    if group_size == 1:  # departure 5: a lone rollout has no baseline to beat
        adv = torch.zeros_like(adv)
    adv = (adv / scale).reshape(-1)
    if expert_rewards is None:
        return adv
    return adv, ((expert_rewards.view(-1, 1) - mu) / scale).view(-1)

# -----------------------------------------------------------------------------
# Eq. B and mixup: each group's l^E, and whether its expert row joins the loss (LUFFY, RL-PLUS).

def advantages(groups, args):
    """Eq. A for every group; Eq. B: l^E is the expert row's pi_old log-probs, shared by the group
    and aligned by response position; mixup decides whether the expert row joins the loss."""
    for g in groups:
        r_on = torch.tensor([r.reward for r in g.rows], dtype=torch.float64)            # (G,)
        r_exp = torch.tensor([g.expert.reward if g.expert else 0.0], dtype=torch.float64)
        adv, adv_e = group_advantages(r_on, args.group_size, args.std_normalize,
                                      expert_rewards=r_exp)
        for r, a in zip(g.rows, adv.tolist()):
            r.adv = a
        g.expert_logp = g.expert.old_logp if g.expert else torch.zeros(0)  # Eq. B; decision 3
        if g.expert:
            pass_rate = sum(r.passed for r in g.rows) / len(g.rows)
            keep = (torch.rand(()).item() < args.mixup_ratio if args.mixup == "random"
                    else args.mixup_pass_min <= pass_rate <= args.mixup_pass_max)
            g.expert.adv = adv_e.item()
            g.expert.in_loss = keep and args.algo in ("luffy", "rlplus")  # CalibRL: never trained
    return groups

# -----------------------------------------------------------------------------
# Eq. C and the baselines, per token; the token-mean over the counted tokens of the mini-batch.

def policy_loss(logp, old_logp, advantages, mask, *, algo="calibrl", expert_logp=None, passed=None,
                expert_rows=None, clip_low=0.2, clip_high=0.2, clip_c=3.0, alpha=0.5, lam=0.1,
                num_tokens=None):
    """logp / old_logp / expert_logp (each row's l^E) / mask (R, T); advantages / passed /
    expert_rows (R,); on an expert row old_logp is pi_old(e_t). -> (sum of the per-token losses of
    the counted tokens) / (num_tokens or their count), and the metrics of this call."""
    R, T = logp.shape
    mask = mask.to(logp.dtype)
    is_exp = (torch.zeros(R, dtype=torch.bool, device=logp.device) if expert_rows is None
              else expert_rows.bool())
    on = mask * (~is_exp)[:, None]                                               # (R, T) on-policy
    A = advantages.to(logp.dtype)[:, None]                                       # (R, 1)
    log_ratio = torch.where(mask > 0, logp - old_logp, torch.zeros_like(logp))  # 0 on padding
    rho = log_ratio.exp()                                                        # (R, T)
    # Eq. C, dual-clip PPO: max(-A rho, -A clip(rho)); for A < 0 also capped at -A c
    pg1, pg2 = -A * rho, -A * rho.clamp(1 - clip_low, 1 + clip_high)
    ppo = torch.maximum(pg1, pg2)
    ppo = torch.where(A < 0, torch.minimum(ppo, -A * clip_c), ppo)
    per_tok = ppo * on
    g = torch.zeros_like(logp)
    if algo == "calibrl":
        # Eq. C, guided term: g = |A| LeakyReLU_alpha(-s (log pi - l^E)), s = +1 passed, -1 failed
        s = passed.to(logp.dtype)[:, None] * 2 - 1                               # (R, 1)
        base = expert_logp if expert_logp is not None else torch.zeros_like(logp)
        g = A.abs() * F.leaky_relu(-s * (logp - base), alpha)
        per_tok = per_tok + lam * g * on                                         # expert rows: out
    elif algo in ("luffy", "rlplus"):
        p = torch.where(mask > 0, logp, torch.zeros_like(logp)).exp()            # pi_theta(e_t)
        if algo == "luffy":  # shaped off-policy term -A_E f(p), f(p) = p / (p + 0.1), no clip
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
        dual = (A < 0) & (torch.maximum(pg1, pg2) > -A * clip_c)
        metrics = {"loss/clipfrac": ((pg2 > pg1).float() * on).sum() / n,
                   "loss/dualclip_frac": (dual.float() * on).sum() / n,
                   "loss/ratio": (rho * on).sum() / n,
                   "loss/ratio_max_dev": ((rho - 1).abs() * on).max(),
                   "loss/ppo": (ppo * on).sum() / n,
                   "loss/guided": (g * on).sum() / n,
                   "loss/approx_kl": (-log_ratio * on).sum() / n,
                   "tokens": own}
    return loss, metrics

# -----------------------------------------------------------------------------
# Update: mini-batches of whole groups, micro-batches with gradient accumulation.

def update(policy, opt, sched, groups, args, device, pad_id, world):
    """One PPO epoch (or --ppo-epochs) over the step's groups -> (stats, the self-check: max
    |rho - 1| in the first mini-batch, where theta is still theta_old)."""
    stats, first_dev, mb = {}, 0.0, args.mini_batch_prompts // world  # prompts per mini-batch here
    for epoch in range(args.ppo_epochs):
        for m0 in range(0, len(groups), mb):
            rows = [(r, g) for g in groups[m0:m0 + mb] for r in g.all_rows() if r.in_loss]
            # departure 2: the token-mean is over the whole mini-batch, all ranks
            num_tokens = max(distributed.all_sum(sum(len(r.resp) for r, _ in rows)), 1.0)
            live = [(r, g) for r, g in rows if r.adv != 0.0]  # departure 8: A = 0 adds exactly 0
            stand_in = (groups[0].rows[0], groups[0])  # dummy work: weight 0
            for batch, w, inputs in micro_batches(live, stand_in, args, policy.model, pad_id,
                                                  device):
                T = max(len(r.resp) for r, _ in batch)
                per_row = lambda f: torch.tensor([f(r) for r, _ in batch], device=device)  # (R,)
                padded = lambda xs: packing.pad_rows(xs, T).to(device)                    # (R, T)
                loss_in = dict(  # Eq. C's inputs: (R, T) and (R,) tensors, then the coefficients
                    old_logp=padded([r.old_logp for r, _ in batch]),
                    mask=padded([torch.ones(len(r.resp)) for r, _ in batch]),
                    expert_logp=padded([g.expert_logp for _, g in batch]),
                    advantages=per_row(lambda r: r.adv).float(), passed=per_row(lambda r: r.passed),
                    expert_rows=per_row(lambda r: r.expert), algo=args.algo, clip_low=args.clip_low,
                    clip_high=args.clip_high, clip_c=args.clip_c, alpha=args.alpha, lam=args.lam,
                    num_tokens=num_tokens)
                loss, m = policy(*inputs, loss=loss_in)
                # FSDP averages gradients over ranks, but the loss is already a global token-mean
                (loss * w * world).backward()
                n = m.pop("tokens").item() * w
                for k, v in m.items():
                    metrics.add(stats, k, v.item(), n)
                if epoch == 0 and m0 == 0 and w:
                    first_dev = max(first_dev, m["loss/ratio_max_dev"].item())
            grad_norm = distributed.clip_grad_norm(policy, args.max_grad_norm)
            if math.isfinite(grad_norm):  # a non-finite loss or gradient: the step is skipped
                opt.step()
                sched.step()
            metrics.add(stats, "loss/skipped_frac", float(not math.isfinite(grad_norm)))
            metrics.add(stats, "loss/grad_norm", grad_norm if math.isfinite(grad_norm) else 0.0)
            opt.zero_grad(set_to_none=True)
    stats.pop("loss/ratio_max_dev", None)
    return stats, distributed.all_max(first_dev)

# -----------------------------------------------------------------------------
# Evaluation: mean@K of K samples (ours) and one greedy response (the official protocol).

@torch.no_grad()
def evaluate(policy, tok, processor, examples, args, device, is_vlm, rank, world):
    examples = examples[: args.eval_max_prompts or None]
    mine, k, stats = examples[rank::world], args.eval_samples, {}
    w, mine = (1.0, mine) if mine else (0.0, examples[:1])  # none here: a stand-in, weight 0
    devices = [device] if device.type == "cuda" else []
    # seed 10_000 + ...: its own stream, and the training stream is left as it was
    whole = args.rollout == "engine"  # vLLM holds its own copy of the weights (synced)
    with torch.random.fork_rng(devices=devices), distributed.gathered(policy, whole):
        torch.manual_seed(10_000 + args.seed + rank)
        encs = [encode_prompt(processor, ex, is_vlm, args.rollout == "vllm") for ex in mine]
        stop = rundir.STOP.requested  # a stop ends the evaluation early (it is then not logged)
        sampled = generate(policy, tok, encs, k, args, interrupt=stop).responses  # budgeted calls
        greedy = generate(policy, tok, encs, 1, args, greedy=True, interrupt=stop).responses
    for p, ex in enumerate(mine):
        score = lambda s: reward_fn(tok.decode(s, skip_special_tokens=True), ex["answer"])
        mine_k = sampled[p * k:(p + 1) * k]                            # K responses to problem p
        (acc, fmt), scores = score(greedy[p]), [score(s) for s in mine_k]
        for key, value in (("accuracy", sum(a for a, _ in scores) / k),           # mean@K: ours
                           ("pass@k", float(any(a == 1.0 for a, _ in scores))),
                           ("format", sum(f for _, f in scores) / k),
                           ("response_length", sum(len(s) for s in mine_k) / k),
                           ("greedy_accuracy", acc),             # the official protocol: n = 1
                           ("greedy_reward", acc + 0.1 * fmt)):  # what it logs
            metrics.add(stats, "eval/" + key, value, w)
    return metrics.reduce_stats(stats)

# -----------------------------------------------------------------------------
# Main loop: rollout -> pi_old log-probs and l^E -> advantages -> update -> log, eval, save.

@rundir.finishes  # however main ends: signal handlers back, the folder unlocked, the group closed
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = distributed.setup_distributed(args.dist_timeout)
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    flags.check_args(args, world)  # every flag's range, before the model loads
    model_path = flags.demo_defaults(args, DEMO_MODEL, DEMO_TRAIN, DEMO_VAL, say)
    # the training stream (sampling, mixup): one per rank, apart for up to 1000 ranks
    torch.manual_seed(args.seed * 1000 + rank)
    dtype, fused = flags.compute_dtype(args.dtype, device), flags.use_fused(args.fused, device)
    # under FSDP the parameters are fp32 master weights, and compute runs in `dtype`
    model, processor, tok, is_vlm = load_model(
        model_path, torch.float32 if distributed.active() else dtype, device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = Policy(model, args.temperature, tok.suppress_ids, fused)
    if distributed.active():
        distributed.shard(policy, dtype, device)
    if args.rollout == "vllm":  # one vLLM engine per rank, all ranks together
        policy.vllm = vllm_rollout.Engine(model_path, model, processor, tok, args, dtype, device)
    eval_set = (load_examples(args.eval_data, args, processor, tok, is_vlm, say, train=False)
                if args.eval_data else [])
    out_dir = rundir.prepare_output_dir(args, rank)  # refused if in use or holding an earlier run
    logger = metrics.Logger(out_dir, rank, args.tensorboard, args.steps)
    def run_eval(step):  # an evaluation cut short by a stop request is not logged
        m = evaluate(policy, tok, processor, eval_set, args, device, is_vlm, rank, world)
        if not rundir.STOP.agreed():
            logger.log(step, m)
    if args.eval_only:
        run_eval(0)
        return out_dir

    data = load_examples(args.data, args, processor, tok, is_vlm, say)
    if len(data) < args.prompts_per_step:
        raise SystemExit(f"error: data file {args.data}: {len(data)} usable rows, fewer than one "
                         f"step's --prompts-per-step {args.prompts_per_step}")
    if args.steps is None:  # one epoch, the last partial step dropped (the official run)
        args.steps = logger.steps = len(data) // args.prompts_per_step
    # before any forward: after one, FSDP2's root holds unsharded parameters the optimizer must not
    # keep; a constant learning rate after a linear warm-up
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = lambda s: min(1.0, (s + 1) / (args.warmup_steps + 1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup)
    stream = dataset.PromptStream(len(data), args.seed, args.shuffle)
    start = checkpoints.resume(policy, opt, sched, stream, out_dir, logger, args, rank, say)
    say(f"calibrl | algo {args.algo} | preset {args.preset} | model {model_path} | "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | {len(data)} train rows "
        f"| world {world} | device {device} {dtype} | fused {fused} | out {out_dir}")
    rundir.STOP.install()  # SIGTERM, SIGINT, SIGUSR1: a checkpoint at the next safe point, exit 0
    if eval_set and args.eval_every and start == 0:
        run_eval(0)

    VERIFY.timeout, VERIFY.budget = args.reward_timeout, args.reward_budget
    bad_streak, diverged = 0, False
    packing.perf_metrics([], device)  # perf/* and mem/peak_gb count from here, step by step
    for step in range(start + 1, args.steps + 1):
        t0, failures, at_start = time.time(), VERIFY.failures, checkpoints.step_start(stream)
        VERIFY.start_step()
        # a strided shard per rank, so mini-batch k holds the same groups for any world size
        examples = [data[i] for i in stream.take(args.prompts_per_step)[rank::world]]
        encs = [encode_prompt(processor, ex, is_vlm, args.rollout == "vllm") for ex in examples]
        try:  # a stop request abandons the rollout or the pi_old pass: no weight has moved yet
            # eval mode: no dropout, and gradient checkpointing (a training-mode feature) stays off
            model.eval()
            with distributed.gathered(policy, args.rollout == "engine"):
                groups, rollout_stats = rollout(policy, tok, examples, encs, args, step)
            t1 = time.time()
            rundir.STOP.check()  # an interrupted rollout returns early on its rank: all must agree
            old_logprobs(policy, groups, args, device, tok.pad_id)
        except rundir.Abandon:  # save the state as it was when this step began: resume replays it
            path = checkpoints.save_before(step, at_start, policy, processor, opt, sched, stream,
                                           out_dir)
            say(f"stopped by signal in step {step}; checkpoint {path}; continue with --resume")
            break
        advantages(groups, args)
        t2 = time.time()
        model.train()
        stats, first_dev = update(policy, opt, sched, groups, args, device, tok.pad_id, world)
        t3 = time.time()

        log = metrics.step_metrics(stats, groups)  # train/*: the on-policy rows' means
        log.update(engine.rollout_metrics(rollout_stats, groups))  # perf/rollout_*, logprob gap
        n_tokens = distributed.all_sum(sum(len(r.resp) for g in groups for r in g.all_rows()))
        log.update({"loss/ratio_first_dev": first_dev, "time/rollout": t1 - t0,
                        "time/logprob": t2 - t1, "time/update": t3 - t2, "time/step": t3 - t0,
                        "perf/tokens_per_sec": n_tokens / (t3 - t0),
                        "train/lr": sched.get_last_lr()[0], "train/reward_seconds": VERIFY.spent,
                        "train/reward_failures": distributed.all_sum(VERIFY.failures - failures),
                        **packing.perf_metrics(encs, device)})  # perf/pad_frac, ..., mem/peak_gb
        logger.log(step, log)
        if first_dev > 1e-3:  # the self-check: pi_theta == pi_old before the first optimizer step
            say(f"warning: step {step}: |rho - 1| = {first_dev:.1e} at theta_old: paths differ?")
        if args.rollout == "vllm":  # its log-probs of its samples should be pi_old's
            vllm_rollout.check_gap(step, log, dtype, args.top_p, say)
        checkpoints.check_weights(policy, step, out_dir)  # non-finite weights stop the run, unsaved
        bad_streak = bad_streak + 1 if log["loss/skipped_frac"] > 0 else 0
        if eval_set and args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            run_eval(step)
        stopping, diverged = rundir.STOP.agreed(), bad_streak >= args.max_bad_steps
        if (args.save_every and step % args.save_every == 0) or step == args.steps or stopping \
                or diverged:
            path = checkpoints.save_checkpoint(policy, processor, opt, sched, stream, step, out_dir,
                                               rank)
        if stopping:
            say(f"stopped by signal after step {step}; checkpoint {path}; continue with --resume")
        if stopping or diverged:
            break
    if diverged:  # the skipped steps left the weights untouched: the checkpoint holds good ones
        raise SystemExit(f"error: non-finite loss or gradient norm in {bad_streak} consecutive "
                         f"steps (up to step {step}); those optimizer steps were skipped and the "
                         f"weights are saved in {path}")
    return out_dir

if __name__ == "__main__":
    rundir.run(main)
