"""
bench_rollout.py -- calibrl's former rollout against the rollout engine (infra/engine.py, what
calibrl.generate runs now), on the same prompts and seed: tokens/s, peak memory, and whether the
sampled tokens are identical.

"today" is calibrl.generate as it was before the engine, kept here as today_generate so that the
comparison outlives it: transformers' generate on left-padded batches of --rollout-batch-prompts
prompts, num_return_sequences = G, the same sampler (softmax(logits / T), the vision ids
suppressed).

CPU, a long-prompt mix (the tiny Qwen2.5-VL, 16 prompts of ~1,000 tokens with their
image, G = 8, 64 new tokens), end-of-sequence honoured and ignored, two budgets:
    OMP_NUM_THREADS=1 python data/bench_rollout.py                        # ~4 minutes, 2 cores
GPU: a randomly initialised model with Qwen2.5-VL-3B's configuration (no download: the config
written out below; the tiny tokenizer and processor, whose special-token ids it takes), bf16, 16
prompts of ~1,000 tokens each with a 448x448 image (256 image tokens), G = 10, 512 new tokens
with end-of-sequence ignored, CUDA memory capped at 80 GB (set_per_process_memory_fraction):
    python data/bench_rollout.py --gpu-3b                                 # .ci/gpu_check.sh runs it
    python data/bench_rollout.py --gpu-3b --smoke   # the same script at toy sizes on the CPU

The rollout backends (--rollout engine / vllm), on the tiny head_dim-64 text model (vLLM's CPU
attention refuses the demo's head_dim 16), the same 16 text prompts, G = 8, 64 new tokens, the
end of sequence ignored, each backend in its own process, through calibrl.generate as training
calls it (vLLM's time includes its weight sync, also given alone); in an environment with vLLM:
    OMP_NUM_THREADS=1 python data/bench_rollout.py --backend both    # or engine, or vllm
On the CPU vLLM is a correctness backend: its speed matters on GPUs.

Every configuration runs in its own subprocess: peak RSS only grows, and each CUDA run starts from
an empty allocator. Peak memory is the CUDA allocator's peak during the rollout (weights
included), else the process's peak RSS, with its rise over the RSS just before the rollout. Each
configuration first runs a one-prompt warm-up through the same path; a table row is printed as
soon as its configuration is done.
"""
import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WORDS = ("the of a number square image count red blue green add think answer total cell grid above "
         "below left right").split()


def prompts(proc, k, words_lo, words_hi, image_px=None, seed=0):
    """k encodings: a demo question with its image (or a random image_px x image_px one) after a
    filler context of words_lo..words_hi words (~2.5 tokens a word with the tiny tokenizer)."""
    import calibrl
    import numpy as np
    from PIL import Image
    args = calibrl.parse_args([])
    exs = calibrl.load_examples(calibrl.DEMO_TRAIN, args, proc, proc.tokenizer, True,
                                say=lambda *a: None)[:k]
    rng = random.Random(seed)
    for i, ex in enumerate(exs):
        filler = " ".join(rng.choice(WORDS) for _ in range(rng.randint(words_lo, words_hi)))
        context = {"type": "text", "text": "Context: " + filler + "\n"}
        ex["messages"][0]["content"].insert(0, context)
        if image_px:
            buf = io.BytesIO()
            px = np.random.RandomState(seed + i).randint(0, 256, (image_px, image_px, 3),
                                                         dtype=np.uint8)
            Image.fromarray(px).save(buf, format="PNG")
            ex["images"] = [{"bytes": buf.getvalue()}]
    return [calibrl.encode_prompt(proc, ex, True) for ex in exs]


def qwen25_vl_3b(smoke):
    """Qwen2.5-VL-3B-Instruct's configuration, written out by hand (its config.json), with the tiny
    tokenizer's special-token ids. smoke: the same structure at toy sizes."""
    from transformers import Qwen2_5_VLConfig
    ids = dict(image_token_id=12, video_token_id=13, vision_start_token_id=9,
               vision_end_token_id=10)
    text = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                num_key_value_heads=2, intermediate_size=11008, vocab_size=151936,
                max_position_embeddings=128000,
                rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True,
                use_sliding_window=False, sliding_window=32768, max_window_layers=70,
                attention_dropout=0.0, bos_token_id=0, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, out_hidden_size=2048, intermediate_size=3420,
                  num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  tokens_per_second=2, hidden_act="silu")
    if smoke:
        text.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128,
                    rope_parameters=dict(text["rope_parameters"], mrope_section=[2, 3, 3]))
        vision.update(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64,
                      num_heads=2, fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)


def today_generate(model, encs, sp, pad_id, batch_prompts, device):
    """The rollout before the engine (calibrl.generate with --rollout-batch-prompts): transformers'
    generate on left-padded batches of batch_prompts prompts, num_return_sequences = sp.n, every
    sampling field set (nothing from generation_config.json). -> [len(encs) * n] responses, each
    cut after its first stop id."""
    import torch
    from transformers import GenerationConfig
    g = sp.greedy
    gen = GenerationConfig(do_sample=not g, temperature=None if g else sp.temperature,
                           top_p=None if g else sp.top_p, top_k=None if g else 0,
                           repetition_penalty=1.0, max_new_tokens=sp.max_new_tokens,
                           num_return_sequences=sp.n, eos_token_id=list(sp.stop_ids),
                           pad_token_id=pad_id, suppress_tokens=list(sp.suppress_ids) or None)
    out = []
    for i in range(0, len(encs), batch_prompts):
        chunk = encs[i:i + batch_prompts]
        L = max(e["input_ids"].shape[1] for e in chunk)
        batch = {}
        for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if key in chunk[0]:
                t = torch.full((len(chunk), L), pad_id if key == "input_ids" else 0,
                               dtype=torch.long)                                # (B, L) left-padded
                for j, e in enumerate(chunk):
                    t[j, L - e[key].shape[1]:] = e[key][0]
                batch[key] = t
        imgs = [e for e in chunk if e.get("pixel_values") is not None]
        for key in ("pixel_values", "image_grid_thw"):  # InternVL: tiles, no grid
            if imgs and key in imgs[0]:
                batch[key] = torch.cat([e[key] for e in imgs])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            seqs = model.generate(**batch, generation_config=gen)               # (B*n, L+T)
        for s in seqs[:, L:].cpu():
            end = torch.isin(s, torch.tensor(list(sp.stop_ids))).nonzero()
            out.append(s[: end[0, 0] + 1] if len(end) else s)
    return out


def tiny_text_model(out_dir, generation_config=None):
    """A randomly initialised Qwen2 text LM that vLLM's CPU attention accepts (head_dim 64: hidden
    128, 2 heads, 1 KV head, 2 layers; the demo's 16 is refused) with the demo tokenizer and a
    text-only chat template, saved to out_dir; generation_config: extra fields for its
    generation_config.json (a shipped Instruct file's penalties, say). -> out_dir."""
    import importlib.util
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    spec = importlib.util.spec_from_file_location("make_demo", os.path.join(ROOT, "data",
                                                                          "make_demo.py"))
    make_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_demo)
    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "data", "tiny-qwen2.5-vl"))
    tok.chat_template = make_demo.TEXT_CHAT_TEMPLATE
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
        eos_token_id=[tok.eos_token_id, tok.pad_token_id], **(generation_config or {}))
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


# -----------------------------------------------------------------------------
# One configuration, in its own process.

def rss_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def worker(cfg, out_path):
    import torch
    import calibrl
    from infra import distributed, engine, sampling
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device("cuda" if cfg["gpu"] and not cfg["smoke"] else "cpu")
    tiny, proc, tok, _ = calibrl.load_model(calibrl.DEMO_MODEL, torch.float32, "cpu")
    if cfg["gpu"]:
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, 80 * 2**30 / total))
        from transformers import Qwen2_5_VLForConditionalGeneration
        torch.manual_seed(0)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # the smoke run too: the GPU's dtype path
        try:
            with torch.device(device):  # random init on the device: no 15 GB of fp32 on the host
                model = Qwen2_5_VLForConditionalGeneration(qwen25_vl_3b(cfg["smoke"]))
        finally:
            torch.set_default_dtype(old)
        size = {"shortest_edge": 56 * 56, "longest_edge": 448 * 448}  # 448 px: 256 image tokens
        proc.image_processor.size = size
        if hasattr(proc.image_processor, "max_pixels"):
            proc.image_processor.max_pixels = 448 * 448
        encs = prompts(proc, cfg["prompts"], 230, 270, image_px=448)
    else:
        model = tiny
        encs = prompts(proc, cfg["prompts"], 280, 520)
    model.eval()
    stop_ids = tok.stop_ids
    if cfg["ignore_eos"]:  # a stop id never sampled (a suppressed one): every response has T tokens
        stop_ids = [tok.suppress_ids[0]]
    sp = sampling.Sampling(cfg["G"], cfg["T"], stop_ids=stop_ids, suppress_ids=tok.suppress_ids)
    lens = [e["input_ids"].shape[1] for e in encs]
    budget = (engine.call_tokens(max(lens), sp.n, sp.max_new_tokens, cfg["budget_prompts"])
              if cfg["budget_prompts"] else 0)

    def run(encs, sp, seed):
        torch.manual_seed(seed)
        if cfg["path"] == "today":
            return today_generate(model, encs, sp, tok.pad_id, cfg["batch_prompts"], device), {}
        calls = engine.plan_calls([e["input_ids"].shape[1] for e in encs], sp.n,
                                 sp.max_new_tokens, budget)
        r = engine.generate(model, encs, sp, calls, pad_id=tok.pad_id, compact=cfg["compact"],
                           cuda_graph=cfg["cuda_graph"], progress=None)
        return r.responses, r.stats

    run(encs[:1], sampling.Sampling(**{**sp.__dict__, "max_new_tokens": 4}), 1)  # warm-up
    rss0, dt = rss_gb(), float("inf")
    for _ in range(cfg["repeats"]):  # the same run (same seed) again: the fastest, on shared CPUs
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        out, stats = run(encs, sp, 0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = min(dt, time.time() - t0)
    n = sum(len(o) for o in out)
    calls = stats.get("perf/rollout_calls", -(-len(encs) // (cfg["batch_prompts"] or 1)))
    res = dict(cfg, seconds=dt, tokens=n, tokens_per_sec=n / dt, prompt_tokens=lens,
               budget=budget, calls=calls,
               max_call_tokens=stats.get("perf/rollout_max_call_tokens"),
               decode_rows=[stats.get("rollout/decode_rows"),
                            stats.get("rollout/decode_rows_dense")],
               peak_gb=distributed.peak_memory_gb(device), rss_before_gb=rss0, device=str(device),
               versions=dict(torch=str(torch.__version__),
                             transformers=__import__("transformers").__version__))
    text = model.config.get_text_config()
    hd = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_position = 2 * text.num_hidden_layers * text.num_key_value_heads * hd * model.dtype.itemsize
    res["kv_arena_gb"] = (res["max_call_tokens"] or 0) * per_position / 2**30  # what is allocated
    torch.save(dict(result=res, responses=[o.cpu() for o in out]), out_path)


def backend_worker(cfg, out_path):
    """--backend: one backend's rollout of cfg's prompts through calibrl.generate -> out_path."""
    import resource
    import torch
    import calibrl
    from infra import vllm_rollout
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = calibrl.parse_args(["--model", cfg["model"], "--preset", "demo", "--rollout",
                               cfg["backend"], "--max-response-length", str(cfg["T"]),
                               "--max-prompt-length", "1024"])  # vLLM's max_model_len: their sum
    device = torch.device("cpu")
    model, _, tok, _ = calibrl.load_model(cfg["model"], torch.float32, device)
    model.eval()
    tok.stop_ids = []  # the end of sequence ignored: every response has T tokens on both backends
    policy = calibrl.Policy(model, args.temperature, tok.suppress_ids, False)
    rng = random.Random(0)
    texts = ["Context: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(100, 200)))
             + f"\nWhat is {i} + {i}?" for i in range(cfg["prompts"])]
    exs = [{"messages": [{"role": "user", "content": [{"type": "text", "text": t}]}]}
           for t in texts]
    encs = [calibrl.encode_prompt(tok, ex, False) for ex in exs]
    rss0 = rss_gb()
    if cfg["backend"] == "vllm":
        policy.vllm = vllm_rollout.Engine(cfg["model"], model, tok, tok, args, torch.float32,
                                          device)
    calibrl.generate(policy, tok, encs[:1], 1, args, key=0)  # warm-up
    best = None
    for _ in range(cfg["repeats"]):
        torch.manual_seed(0)
        t0 = time.time()
        r = calibrl.generate(policy, tok, encs, cfg["G"], args, key=1)
        dt = time.time() - t0
        if best is None or dt < best[0]:
            best = dt, r
    dt, r = best
    n = sum(len(x) for x in r.responses)
    res = dict(cfg, seconds=dt, tokens=n, tokens_per_sec=n / dt,
               sync_s=r.stats.get("time/weight_sync", 0.0), rss_before_gb=rss0,
               peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               prompt_tokens=[e["input_ids"].shape[1] for e in encs])
    torch.save(dict(result=res), out_path)
    os._exit(0)  # vLLM's engine-core teardown is not needed for a measurement


def backends(which, repeats):
    """--backend: each backend in its own process on the same prompts; prints a table."""
    import torch
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "CUDA_VISIBLE_DEVICES": ""}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_text_model(os.path.join(tmp, "m"))
        print("| backend | tokens | s | tokens/s | of which weight sync s | peak RSS GB (rise) |\n"
              "|---|---|---|---|---|---|")
        for b in (["engine", "vllm"] if which == "both" else [which]):
            cfg = dict(backend=b, model=model, prompts=16, G=8, T=64, repeats=repeats)
            path = os.path.join(tmp, b + ".pt")
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--backend-worker",
                                json.dumps(cfg), "--out", path], env=env, capture_output=True,
                               text=True)
            if p.returncode != 0 or not os.path.exists(path):
                print(f"{b}: FAILED\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}", flush=True)
                sys.exit(1)
            r = torch.load(path)["result"]
            lens = r["prompt_tokens"]
            rise = r["peak_gb"] - r["rss_before_gb"]
            print(f"| {b} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_sec']:.0f} | "
                  f"{r['sync_s']:.3f} | {r['peak_gb']:.2f} (+{rise:.2f}) |", flush=True)
        print(f"\nCPU, {len(lens)} prompts of {min(lens)}-{max(lens)} tokens, G = 8, 64 new "
              f"tokens, the fastest of {repeats}; peak RSS includes vLLM's KV cache "
              "(VLLM_CPU_KVCACHE_SPACE GiB)")


# -----------------------------------------------------------------------------
# The table.

def row(name, r, results):
    res = r["result"]
    ref = results.get("today" + (", EOS ignored" if res["ignore_eos"] and not res["gpu"] else ""))
    same = "-"
    if ref and ref is not r:
        n_same = sum(x.equal(y) for x, y in zip(ref["responses"], r["responses"]))
        same = f"{n_same}/{len(r['responses'])}"
    speed = f"{res['tokens_per_sec'] / ref['result']['tokens_per_sec']:.1f}x" if ref else "-"
    rise = res["peak_gb"] - res["rss_before_gb"]
    rise = "" if res["device"].startswith("cuda") else f" (+{rise:.2f})"
    rows = res["decode_rows"]
    fed = f"{rows[0] / rows[1]:.0%}" if rows[0] is not None and rows[1] else "-"
    kv = f"{res['budget']} / {res['max_call_tokens']} ({res['kv_arena_gb']:.3f})" \
        if res["max_call_tokens"] else "-"
    return (f"| {name} | {res['calls']} | {kv} | {res['tokens']} | {res['seconds']:.2f} | "
            f"{res['tokens_per_sec']:.0f} | {speed} | {res['peak_gb']:.2f}{rise} | {fed} | "
            f"{same} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu-3b", action="store_true",
                   help="the GPU benchmark at Qwen2.5-VL-3B's shape")
    p.add_argument("--smoke", action="store_true", help="with --gpu-3b: toy sizes on the CPU")
    p.add_argument("--only", default=None, help="configuration names to run, separated by ';'")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per configuration, the fastest kept (default 2 on the CPU, "
                        "1 on a GPU)")
    p.add_argument("--backend", choices=["engine", "vllm", "both"], default=None,
                   help="the rollout backends (--rollout) on the tiny text model, each in its "
                        "own process")
    p.add_argument("--backend-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(json.loads(a.worker), a.out)
    if a.backend_worker:
        return backend_worker(json.loads(a.backend_worker), a.out)
    a.repeats = a.repeats or (1 if a.gpu_3b and not a.smoke else 2)
    if a.backend:
        return backends(a.backend, a.repeats)
    base = dict(gpu=a.gpu_3b, smoke=a.smoke, repeats=a.repeats, compact=True, cuda_graph=False,
                batch_prompts=0, budget_prompts=0, ignore_eos=False)
    if a.gpu_3b:  # today: --rollout-batch-prompts 16, the paper preset's before the rollout engine
        base.update(prompts=2 if a.smoke else 16, G=2 if a.smoke else 10, T=8 if a.smoke else 512,
                    ignore_eos=True)
        configs = {
            "today": dict(path="today", batch_prompts=16),
            "engine, 1 call": dict(path="engine", budget_prompts=16),
            "engine, 1 call, CUDA graph": dict(path="engine", budget_prompts=16, cuda_graph=True),
            "engine, 4 prompts a call": dict(path="engine", budget_prompts=4),
        }
    else:
        base.update(prompts=16, G=8, T=64)
        configs = {}
        for eos in (False, True):
            tag = ", EOS ignored" if eos else ""
            configs.update({
                f"today{tag}": dict(path="today", batch_prompts=16, ignore_eos=eos),
                f"engine, 1 call, no compaction{tag}": dict(path="engine", budget_prompts=16,
                                                            compact=False, ignore_eos=eos),
                f"engine, budget of 16 prompts{tag}": dict(path="engine", budget_prompts=16,
                                                           ignore_eos=eos),
                f"engine, budget of 2 prompts{tag}": dict(path="engine", budget_prompts=2,
                                                          ignore_eos=eos),
            })
    if a.only:
        configs = {k: v for k, v in configs.items() if k in a.only.split(";")}
    results = {}
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as tmp:
        for name, c in configs.items():
            path = os.path.join(tmp, f"{len(results)}.pt")
            t = time.time()
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                                json.dumps({**base, **c}), "--out", path], env=env,
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{name}: FAILED\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}", flush=True)
                sys.exit(1)
            import torch
            results[name] = torch.load(path)
            if len(results) == 1:
                res = results[name]["result"]
                lens = res["prompt_tokens"]
                print(f"\n{res['device']}, torch {res['versions']['torch']}, transformers "
                      f"{res['versions']['transformers']}: {len(lens)} prompts of {min(lens)}-"
                      f"{max(lens)} tokens (mean {sum(lens) / len(lens):.0f}), G = {res['G']}, "
                      f"{res['T']} new tokens\n\ntokens/s: generated tokens / seconds of the "
                      "rollout, "
                      f"the fastest of {a.repeats} runs; peak memory: CUDA allocator peak (weights "
                      "included) or process peak RSS (its rise over the RSS before the rollout); "
                      "budget: --rollout-max-tokens; decode rows fed: query rows the decode steps "
                      "ran, against a batch that never shrinks\n")
                print("| configuration | calls | budget / largest call: KV positions (GB) | tokens "
                      "| s | tokens/s | vs today | peak memory GB (rise) | decode rows fed | "
                      "samples identical to today |\n|---|---|---|---|---|---|---|---|---|---|")
            print(row(name, results[name], results), flush=True)
            print(f"done {name} ({time.time() - t:.0f}s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
