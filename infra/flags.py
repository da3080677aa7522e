"""
infra/flags.py -- the command line beyond its declaration (calibrl.Args): the range of every flag,
checked before the model loads; what `auto` means for --dtype and --fused (and the kernel file
--fused loads); the demo's defaults when --model or --data is not given.

Apart because a reader of calibrl.py sees each flag once, where it is declared, with its help;
what a wrong value says lives here, one message naming the flag and what it allows.
"""
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # calibrl.py's folder

RANGES = {  # flag: the values it allows (and every value must be finite)
    "steps": ">= 1", "group_size": ">= 1", "prompts_per_step": ">= 1", "mini_batch_prompts": ">= 1",
    "micro_batch_size": ">= 1", "rollout_max_tokens": ">= 1", "ppo_epochs": ">= 1",
    "max_bad_steps": ">= 1", "eval_samples": ">= 1", "max_prompt_length": ">= 1",
    "max_response_length": ">= 1", "eval_every": ">= 0", "save_every": ">= 0",
    "eval_max_prompts": ">= 0", "warmup_steps": ">= 0", "seed": ">= 0", "weight_decay": ">= 0",
    "lam": ">= 0", "clip_high": ">= 0", "lr": "> 0", "temperature": "> 0", "max_grad_norm": "> 0",
    "reward_timeout": "> 0", "reward_budget": "> 0", "dist_timeout": "> 0", "clip_c": "> 1",
    "top_p": "(0, 1]", "clip_low": "[0, 1)", "alpha": "[0, 1]", "mixup_ratio": "[0, 1]",
    "mixup_pass_min": "[0, 1]", "mixup_pass_max": "[0, 1]", "vllm_gpu_memory": "(0, 1]",
    "vllm_max_seqs": ">= 1", "vllm_max_batched_tokens": ">= 1",
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
    if args.rollout == "vllm":
        check_vllm(args)
    longest = args.max_prompt_length + args.max_response_length
    if args.pack != "off" and args.max_tokens_per_micro_batch < longest:
        # the budget is what memory was sized for: a row over it would fail hours into a run
        raise SystemExit(f"error: --max-tokens-per-micro-batch {args.max_tokens_per_micro_batch} < "
                         f"--max-prompt-length {args.max_prompt_length} + --max-response-length "
                         f"{args.max_response_length}: the longest row would not fit one "
                         f"micro-batch; raise it to at least {longest} (or --pack off)")


def check_vllm(args):
    """--rollout vllm: vLLM installed (found, not imported: that takes seconds), and the flags
    that only the engine reads not given."""
    import importlib.util
    from infra import vllm_rollout
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit(f"error: {vllm_rollout.MISSING}")
    if args.rollout_cuda_graph:
        raise SystemExit("error: --rollout-cuda-graph is the engine's: vLLM captures its own CUDA "
                         "graphs (drop the flag with --rollout vllm)")
    if args.temperature > 2:  # vLLM's SamplingParams refuses it, at the first rollout
        raise SystemExit(f"error: --rollout vllm: --temperature {args.temperature} > 2, vLLM's "
                         "largest (the engine takes any)")
    most = max(args.group_size, args.eval_samples)
    if most > vllm_rollout.SEED_SPACING:
        raise SystemExit(f"error: --rollout vllm: --group-size / --eval-samples {most} > "
                         f"{vllm_rollout.SEED_SPACING}, the seeds one prompt's samples may take")


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
        subprocess.run([sys.executable, os.path.join(ROOT, "data", "make_demo.py")], check=True)
    if args.data is None:
        args.data, args.eval_data = demo_train, args.eval_data or demo_val
        if args.model:
            say(f"notice: no --data given; training {args.model} on the bundled demo data")
    return args.model or demo_model


def fused_ops():
    """kernels/fused_calibrl.py, loaded by its path under a name of its own. kernels/ is no package
    on purpose: an installed distribution named `kernels` (Hugging Face's, which transformers
    imports when present) must neither be shadowed by this folder nor shadow it."""
    name = "calibrl_fused_kernels"
    if name not in sys.modules:
        import importlib.util
        path = os.path.join(ROOT, "kernels", "fused_calibrl.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: importable by name while it runs
        spec.loader.exec_module(module)
    return sys.modules[name]
