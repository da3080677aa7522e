"""
bench.py -- forward + backward of the CalibRL loss through the LM head: naive vs fused vs Liger.

    python kernels/bench.py                                                   # CPU: interpreter, small shape
    python kernels/bench.py --n 32768 --h 2048 --v 151936 --dtype bfloat16    # GPU: Qwen2.5-VL-3B head
    python kernels/bench.py --e2e                                             # 2 steps of calibrl.py --fused on

Paths, all with gradients w.r.t. hidden (R, T, H) and the head W (V, H), N = R*T tokens, all valid:
  naive  logits = hidden @ W^T materialised, calibrl.token_logprobs + calibrl.policy_loss
  fused  kernels.fused_policy_loss
  liger  liger_kernel's LigerFusedLinearGRPOLoss (beta 0, dapo token-mean), when installed
Time: median over --repeats after --warmup, all in this process. Floor: 8*N*H*V FLOPs at the rate
of a plain (N, H) @ (H, min(V, 16384)) matmul measured here. Memory: peak above the inputs and the
returned gradients: torch.cuda.max_memory_allocated on a GPU; on the CPU the ru_maxrss increase of a
fresh subprocess per path (VmHWM after a warm-up at a tiny shape and a reset of the high-water mark).
CPU runs use --threads 1 by default: on a small shared machine two OpenMP threads mostly wait.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import calibrl  # noqa: E402  (sets TRITON_INTERPRET=1 without CUDA, before triton is imported)
fused = calibrl.fused_ops()  # kernels/fused_calibrl.py, loaded by path (kernels/ is no package)
fused_policy_loss = fused.fused_policy_loss

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(n, h, v, rows, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    T = n // rows
    hidden = (torch.randn(rows, T, h, device=DEV, generator=g) * 0.5).to(dtype).requires_grad_()  # (R, T, H)
    weight = (torch.randn(v, h, device=DEV, generator=g) * 0.05).to(dtype).requires_grad_()       # (V, H)
    targets = torch.randint(0, v, (rows, T), device=DEV, generator=g)                             # (R, T)
    mask = torch.ones(rows, T, device=DEV)
    adv = torch.randn(rows, device=DEV, generator=g)                                             # no A = 0 row
    b = dict(targets=targets, mask=mask, advantages=adv, passed=adv > 0,
             expert_logp=-torch.rand(rows, T, device=DEV, generator=g) * 5)
    with torch.no_grad():   # pi_old from the fused forward: the ratio starts at 1, as in training
        b["old_logp"] = fused.fused_logprobs(hidden.view(-1, h), weight, targets.view(-1))[0].view(rows, T)
    return hidden, weight, b


def step_naive(hidden, weight, b):
    logits = hidden @ weight.T                                                     # (R, T, V) materialised
    logp = calibrl.token_logprobs(logits, b["targets"])[0]
    loss, _ = calibrl.policy_loss(logp, b["old_logp"], b["advantages"], b["mask"], passed=b["passed"],
                                  expert_logp=b["expert_logp"])
    loss.backward()


def step_fused(hidden, weight, b):
    loss, _ = fused_policy_loss(hidden, weight, b["targets"], b["old_logp"], b["mask"], advantages=b["advantages"],
                                passed=b["passed"], expert_logp=b["expert_logp"])
    loss.backward()


def step_liger(hidden, weight, b):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo")
    out = fn(hidden, weight, b["targets"], b["mask"], b["advantages"], old_per_token_logps=b["old_logp"])
    (out[0] if isinstance(out, tuple) else out).backward()


STEPS = {"naive": step_naive, "fused": step_fused, "liger": step_liger}


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def run_once(step, hidden, weight, b):
    hidden.grad = weight.grad = None
    sync()
    t0 = time.perf_counter()
    step(hidden, weight, b)
    sync()
    return time.perf_counter() - t0


def grad_bytes(hidden, weight):
    return (hidden.numel() + weight.numel()) * hidden.element_size()


def peak_gpu(step, hidden, weight, b):
    hidden.grad = weight.grad = None
    torch.cuda.empty_cache()
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(hidden, weight, b)
    sync()
    return torch.cuda.max_memory_allocated() - base - grad_bytes(hidden, weight)


def max_rss():
    """This process's RSS high-water mark in bytes: VmHWM, i.e. ru_maxrss without the part that Linux
    carries over from the parent across fork + exec (which would hide everything below the parent's size)."""
    with open("/proc/self/status") as f:
        kb = next((int(line.split()[1]) for line in f if line.startswith("VmHWM")), None)
    return (kb or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_cpu_child(a):
    """Runs in a fresh process: RSS high-water increase of one forward + backward."""
    step = STEPS[a.child]
    step(*make_inputs(64, 16, 256, 4, DTYPES[a.dtype]))        # warm-up: imports, interpreter, allocator
    hidden, weight, b = make_inputs(a.n, a.h, a.v, a.rows, DTYPES[a.dtype])
    with open("/proc/self/clear_refs", "w") as f:   # Linux: reset the RSS high-water mark to the current RSS
        f.write("5")
    before = max_rss()
    step(hidden, weight, b)
    after = max_rss()
    print(json.dumps({"peak": after - before - grad_bytes(hidden, weight)}))


def peak_cpu(name, a):
    cmd = [sys.executable, __file__, "--child", name] + [f"--{k}={getattr(a, k)}" for k in ("n", "h", "v", "rows", "dtype", "threads")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def matmul_rate(n, h, v, dtype):
    vm = min(v, 16384)
    x, y = torch.randn(n, h, device=DEV).to(dtype), torch.randn(h, vm, device=DEV).to(dtype)
    times = []
    while len(times) < 5 or sum(times) < 0.2:   # warm and long enough to be stable at small shapes
        sync()
        t0 = time.perf_counter()
        x @ y
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n * h * vm / statistics.median(times[2:])


def e2e(a):
    """2 training steps of calibrl.py on its tiny default model, fused on and off (run folders in /tmp)."""
    for fused in ("on", "off"):
        cmd = [sys.executable, "calibrl.py", "--fused", fused, "--dtype", a.dtype or "bfloat16", "--steps", "2",
               "--output-dir", tempfile.mkdtemp(prefix=f"bench-e2e-{fused}-")]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        print(f"$ python {' '.join(cmd[1:])}\n  rc={out.returncode}  wall {time.perf_counter() - t0:.1f} s")
        tail = out.stdout.strip().splitlines()[-3:] + (out.stderr.strip().splitlines()[-3:] if out.returncode else [])
        print("\n".join("  | " + line for line in tail))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256, help="tokens N (= rows * T)")
    p.add_argument("--h", type=int, default=64, help="hidden size H")
    p.add_argument("--v", type=int, default=512, help="vocab size V")
    p.add_argument("--rows", type=int, default=8, help="rows R (T = N / R)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="default: float32 on the CPU, bfloat16 on a GPU and for --e2e")
    p.add_argument("--paths", default="naive,fused,liger", help="comma-separated subset of naive,fused,liger")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3 if DEV == "cpu" else 5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs only)")
    p.add_argument("--e2e", action="store_true", help="instead: 2 steps of calibrl.py with --fused on / off")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if DEV == "cpu":
        torch.set_num_threads(a.threads)
    if a.child:
        return peak_cpu_child(a)
    if a.e2e:
        return e2e(a)
    a.dtype = a.dtype or ("float32" if DEV == "cpu" else "bfloat16")
    dtype = DTYPES[a.dtype]
    print(f"device {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu (Triton interpreter)'}  "
          f"N={a.n} H={a.h} V={a.v} R={a.rows} {a.dtype}")
    rate = matmul_rate(a.n, a.h, a.v, dtype)
    floor = 8 * a.n * a.h * a.v / rate
    print(f"matmul rate {rate / 1e12:.3f} TFLOP/s -> 8NHV floor {floor * 1e3:.2f} ms")
    hidden, weight, b = make_inputs(a.n, a.h, a.v, a.rows, dtype)
    results = {}
    for name in a.paths.split(","):
        if name == "liger":
            try:
                import liger_kernel  # noqa: F401
            except ImportError:
                print(f"{name:6s} skipped: liger_kernel is not installed")
                continue
        try:
            for _ in range(a.warmup):
                run_once(STEPS[name], hidden, weight, b)
            t = statistics.median(run_once(STEPS[name], hidden, weight, b) for _ in range(a.repeats))
            mem = peak_gpu(STEPS[name], hidden, weight, b) if DEV == "cuda" else peak_cpu(name, a)
        except Exception as e:   # e.g. the naive path out of memory at the full shape
            print(f"{name:6s} failed: {type(e).__name__}: {str(e)[:200]}")
            if DEV == "cuda":
                torch.cuda.empty_cache()
            continue
        results[name] = (t, mem)
    ref = results.get("naive")
    for name, (t, mem) in results.items():
        vs = f"  vs naive: time x{t / ref[0]:.2f}" if ref else ""
        vs += f"  mem x{mem / ref[1]:.3f}" if ref and ref[1] > 2**20 else ""
        print(f"{name:6s} {t * 1e3:10.2f} ms  {t / floor:8.2f} x floor  peak +{mem / 2**20:10.1f} MiB{vs}")


if __name__ == "__main__":
    main()
