"""
data/bench_packing.py -- the pi_old pass and one update, packed with each prompt once per
micro-batch (--pack on), packed one row at a time (--pack rows) and padded (--pack off), run by
calibrl's own old_logprobs and update on a long-tailed mix of rows:

    python data/bench_packing.py              # tiny Qwen2.5-VL on the CPU: both tables (~1 min)
    python data/bench_packing.py --quick      # 8 prompts, no budget sweep (~10 s)
    python data/bench_packing.py --quick --prompt-tokens 1000 --resp-mean 100 --resp-cap 200
                                              # the long-prompt mix: ~1,000-token prompts, G = 8
    python data/bench_packing.py --model /tmp/qwen2.5-vl-3b-random --device cuda \
        --dtype bfloat16 --fused --gradient-checkpointing --image-size 448 --resp-mean 600 \
        --resp-cap 4096 --max-tokens 32768 --micro-batch-size 8 --memory-cap-gb 80
                                              # the 3B shape on a GPU (.ci/gpu_check.sh step 05)

The mix: P prompts x (G sampled rows + the expert's row), each prompt --prompt-tokens long with a
filler context when asked; half the prompts have a square image,
half a 4:3 one twice as wide (two image sizes); response lengths lognormal with mean --resp-mean,
capped at --resp-cap, one row of --resp-cap tokens; a quarter of the groups have equal rewards
(A = 0: their rows skip the update, departure 8). Random response ids of ordinary tokens. The
update is one optimizer step (AdamW) over all P prompts, CalibRL's loss.

Memory is the peak above what was resident just before the measured passes (model, optimizer
state, data, imports; one group's warm-up ran both passes first): on a GPU the CUDA allocator's
peak (reset per configuration; all configurations share one process, one model load;
--memory-cap-gb caps the allocator to show what fits on a smaller GPU), on the CPU the process's
peak RSS, which only grows: one process per configuration. Table 2 is the update alone, two
budgets x two longest rows, padded for contrast: packed, the budget sets the memory, not the
longest row.
"""
import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def make_groups(processor, tok, cfg, seed=0):
    """-> [calibrl.Group]: the mix described above, rewards set (calibrl.advantages gives A)."""
    import torch
    from PIL import Image
    import calibrl
    g = torch.Generator().manual_seed(seed)
    P, G, side = cfg["P"], cfg["G"], cfg["image_size"]
    ip = processor.image_processor  # room for the larger image: the demo processor caps at 112^2
    ip.size = dict(ip.size, longest_edge=max(ip.size["longest_edge"], 3 * side * side))
    sigma = 1.0
    mu = math.log(cfg["resp_mean"]) - sigma ** 2 / 2           # lognormal mean: exp(mu + sigma^2/2)
    groups = []
    for p in range(P):
        w, h = (side, side) if p % 2 == 0 else (2 * side, 3 * side // 2)
        image = Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
        text = f"How many squares are in the image? Add {p % 5} to it. " + calibrl.INSTRUCTION
        words = "the of a number square image count red blue add think answer cell grid".split()
        while len(tok(text, add_special_tokens=False)["input_ids"]) < cfg["prompt_tokens"] - 40:
            text = " ".join(words[int(torch.randint(len(words), (), generator=g))] for _ in range(20)) \
                + " " + text                               # a context in front: the long-prompt mix
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        chat = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        enc = dict(processor(text=[chat], images=[image], return_tensors="pt"))
        lengths = torch.empty(G + 1).log_normal_(mu, sigma, generator=g).round()
        lengths = lengths.clamp(1, cfg["resp_cap"]).long().tolist()
        if p == 0:
            lengths[0] = cfg["longest"]
        resp = [torch.randint(20, 541, (T,), generator=g) for T in lengths]  # ordinary ids
        rows = [calibrl.Row(r) for r in resp[:G]]
        group = calibrl.Group({}, enc, rows, expert=calibrl.Row(resp[G], expert=True))
        acc = (torch.rand(G, generator=g) < 0.5).float().tolist()
        if p % 4 == 3:                                           # a quarter of the groups: A = 0
            acc = [float(p % 8 == 3)] * G
        for r, a in zip(rows, acc):
            r.acc = a
        group.expert.acc = 1.0
        groups.append(group)
    return groups


def run(cfgs):
    """Configurations sharing a model, in this process -> one dict of measurements each."""
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    sys.path.insert(0, ROOT)
    import calibrl
    from infra import family, packing
    c0 = cfgs[0]
    device = torch.device(c0["device"])
    model, processor, tok, _ = calibrl.load_model(c0["model"] or calibrl.DEMO_MODEL,
                                                  getattr(torch, c0["dtype"]), device)
    if c0["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if device.type == "cuda" and c0["memory_cap_gb"]:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, c0["memory_cap_gb"] * 2 ** 30 / total))
    policy = calibrl.Policy(model, 1.0, tok.suppress_ids, c0["fused"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sched = type("Constant", (), {"step": lambda self: None})()
    def counted():
        n = dict(packing.FORWARDS)
        packing.FORWARDS.update(positions=0, padding=0, images=0, rows=0)
        return n["positions"], n["padding"], n["images"]

    def one(cfg, groups, opt, out):
        argv = ["--group-size", str(cfg["G"]), "--prompts-per-step", str(cfg["P"]),
                "--mini-batch-prompts", str(cfg["P"]), "--pack", cfg["mode"],
                "--micro-batch-size", str(cfg["mbs"]), "--max-tokens-per-micro-batch",
                str(cfg["budget"])]
        args = calibrl.parse_args(argv)
        warm = groups[1:2]  # warm-up: first-call allocations, Triton compiles, Adam state
        model.eval()
        calibrl.old_logprobs(policy, warm, args, device, tok.pad_id)
        calibrl.advantages(warm, args)
        model.train()
        calibrl.update(policy, opt, sched, warm, args, device, tok.pad_id, 1)
        gc.collect()
        sync()
        mem0 = torch.cuda.memory_allocated(device) / 2 ** 20 if device.type == "cuda" else rss_mb()
        packing.perf_metrics([], device)  # the counters and the CUDA peak start afresh
        if cfg["passes"] == "both":
            model.eval()
            t = time.perf_counter()
            calibrl.old_logprobs(policy, groups, args, device, tok.pad_id)
            sync()
            out["old_s"] = time.perf_counter() - t
            out["old_positions"], out["old_pad"], out["old_images"] = counted()
        else:  # the update alone: pi_old as zeros
            for r in (r for g in groups for r in g.all_rows()):
                r.old_logp, r.entropy = torch.zeros(len(r.resp)), torch.zeros(len(r.resp))
        calibrl.advantages(groups, args)
        model.train()
        t = time.perf_counter()
        calibrl.update(policy, opt, sched, groups, args, device, tok.pad_id, 1)
        sync()
        out["upd_s"] = time.perf_counter() - t
        out["upd_positions"], out["upd_pad"], out["upd_images"] = counted()
        if device.type == "cuda":
            out["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20 - mem0
        else:
            out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - mem0

    results = []
    for cfg in cfgs:
        groups = make_groups(processor, tok, cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        out = dict(cfg, rows=sum(len(g.all_rows()) for g in groups),
                   prompt_lengths=[g.enc["input_ids"].shape[1] for g in groups],
                   images=sum(family.num_images(g.enc) for g in groups),
                   response_tokens=sum(len(r.resp) for g in groups for r in g.all_rows()))
        try:
            one(cfg, groups, opt, out)
        except ValueError as e:  # the plan refuses a row over the budget
            out["error"] = "over budget" if "max-tokens" in str(e) else str(e)[:80]
        except torch.OutOfMemoryError:
            out["error"] = "out of memory"
        results.append(out)
        del opt, groups
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def spawn(cfgs):
    """run(cfgs) in a subprocess (OMP_NUM_THREADS 1 unless set: the CPU is shared)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--run", json.dumps(cfgs)],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    if res.returncode:
        raise SystemExit(f"configurations {cfgs} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(cfgs):
    """Each configuration in its own process on the CPU (peak RSS only grows); all in one on a
    GPU (the allocator's peak is reset per configuration)."""
    if cfgs[0]["device"] == "cpu":
        return [spawn([c])[0] for c in cfgs]
    return spawn(cfgs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="8 prompts, no budget sweep")
    ap.add_argument("--model", default=None, help="default: the tiny Qwen2.5-VL in data/")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--fused", action="store_true", help="the fused Triton op (calibrl --fused)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=56, help="side of the square images; the "
                    "others are 2x by 1.5x that")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="pad each prompt to about this "
                    "many tokens with a filler context (the long-prompt mix: 1000)")
    ap.add_argument("--resp-mean", type=float, default=60)
    ap.add_argument("--resp-cap", type=int, default=400)
    ap.add_argument("--micro-batch-size", type=int, default=16, help="padded: rows per forward")
    ap.add_argument("--max-tokens", type=int, default=4096, help="packed: tokens per forward")
    ap.add_argument("--memory-cap-gb", type=float, default=0, help="GPU: cap the allocator (80)")
    a = ap.parse_args()
    if a.run:
        print(json.dumps(run(json.loads(a.run))))
        return
    base = dict(P=8 if a.quick else a.prompts, G=a.group_size, image_size=a.image_size,
                resp_mean=a.resp_mean, resp_cap=a.resp_cap, prompt_tokens=a.prompt_tokens, longest=a.resp_cap, passes="both",
                budget=a.max_tokens, mbs=a.micro_batch_size, model=a.model, device=a.device,
                dtype=a.dtype, fused=a.fused, gradient_checkpointing=a.gradient_checkpointing,
                memory_cap_gb=a.memory_cap_gb)
    longest, budgets = (a.resp_cap, 4 * a.resp_cap), (a.max_tokens // 2, 2 * a.max_tokens)
    cfgs = [dict(base, mode=m) for m in ("off", "rows", "on")]
    if not a.quick:
        for n in longest:
            cfgs += [dict(base, mode="on", passes="update", budget=b, longest=n) for b in budgets]
            cfgs.append(dict(base, mode="off", passes="update", longest=n))
    res = measure(cfgs)
    pd, pr, pk = res[:3]
    for r in (pd, pr, pk):
        if "error" in r:
            raise SystemExit(f"--pack {r['mode']}: {r['error']}")
    prompt = sum(g for g in pk["prompt_lengths"]) / len(pk["prompt_lengths"])
    print(f"\n{pd['P']} prompts x ({pd['G']} + 1) rows = {pd['rows']} rows, {pd['images']} images, "
          f"prompts of {prompt:.0f} tokens on average, {pd['response_tokens']} response tokens "
          f"(lognormal mean {a.resp_mean:g}, cap {a.resp_cap}); {a.model or 'tiny Qwen2.5-VL'}, "
          f"{a.device} {a.dtype}{', fused' if a.fused else ''}"
          f"{', gradient checkpointing' if a.gradient_checkpointing else ''}")
    print(f"padded: --pack off --micro-batch-size {a.micro_batch_size}; packed (rows; on: each "
          f"prompt once): --max-tokens-per-micro-batch {a.max_tokens}\n")
    print(f"{'':8s}{'pass':8s}{'positions':>10s}{'pad_frac':>10s}{'vision_enc':>11s}{'time_s':>8s}")
    for name, r in (("padded", pd), ("rows", pr), ("shared", pk)):
        for p, what in (("old", "pi_old"), ("upd", "update")):
            n = r[p + "_positions"]
            print(f"{name:8s}{what:8s}{n:10d}{r[p + '_pad'] / n:10.3f}"
                  f"{r[p + '_images'] / r['images']:11.2f}{r[p + '_s']:8.2f}")
    pos = lambda r: r["old_positions"] + r["upd_positions"]  # noqa: E731
    pad = lambda r: (r["old_pad"] + r["upd_pad"]) / pos(r)  # noqa: E731
    enc = lambda r: (r["old_images"] + r["upd_images"]) / r["images"]  # noqa: E731
    sec = lambda r: r["old_s"] + r["upd_s"]  # noqa: E731
    print(f"\nboth passes: perf/pad_frac {pad(pd):.3f} -> {pad(pr):.3f} -> {pad(pk):.3f}; "
          f"perf/vision_encodes {enc(pd):.2f} -> {enc(pr):.2f} -> {enc(pk):.2f}")
    for name, r in (("padded", pd), ("rows", pr)):
        print(f"{name} / shared: positions {pos(r) / pos(pk):.2f}x, time {sec(r) / sec(pk):.2f}x, "
              f"peak memory {r['peak_mb']:.0f} / {pk['peak_mb']:.0f} MB = "
              f"{r['peak_mb'] / max(pk['peak_mb'], 1e-9):.2f}x")
    if not a.quick:
        cell = lambda r: (f"{r['error']:>20s}" if "error" in r  # noqa: E731
                          else f"{r['peak_mb']:17.0f} MB")
        print("\nupdate peak memory (above the loaded model and Adam state), one optimizer step:")
        print(f"{'':28s}" + "".join(f"{f'longest row {n}':>20s}" for n in longest))
        sweep = res[3:]
        labels = [f"packed, budget {b}" for b in budgets] + [f"padded, {a.micro_batch_size} rows"]
        for k, label in enumerate(labels):
            print(f"{label:28s}" + "".join(cell(sweep[j * 3 + k]) for j in range(len(longest))))


if __name__ == "__main__":
    main()
