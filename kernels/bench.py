"""
bench.py -- forward + backward of the CalibRL loss through the LM head: naive vs fused vs Liger, and a
float64 check of the fused result at the benchmarked shape.

    python kernels/bench.py                                                         # CPU: interpreter, small shape
    python kernels/bench.py --n 32768 6144 --h 2048 --v 151936 --dtype bfloat16    # GPU: Qwen2.5-VL-3B head
    python kernels/bench.py --e2e                                                   # 2 steps of calibrl.py --fused on

Paths, all with gradients w.r.t. hidden (R, T, H) and the head W (V, H), N = R*T tokens, all valid:
  naive  logits = hidden @ W^T materialised, calibrl.token_logprobs + calibrl.policy_loss
  fused  fused_policy_loss from kernels/fused_calibrl.py (Eq. C in the kernel)
  liger  liger_kernel's LigerFusedLinearGRPOLoss (beta 0, dapo token-mean), when installed
Time: median over --repeats after --warmup, all in this process. Floor: 8*N*H*V FLOPs at the rate
of a plain (N, H) @ (H, min(V, 16384)) matmul measured here. Memory: peak above the inputs and the
returned gradients: torch.cuda.max_memory_allocated on a GPU; on the CPU the ru_maxrss increase of a
fresh subprocess per path (VmHWM after a warm-up at a tiny shape and a reset of the high-water mark).
CPU runs use --threads 1 by default: on a small shared machine two OpenMP threads mostly wait.

Check (after the timing, same inputs, same call): the fused loss and metrics against
calibrl.policy_loss on float64 log-probs of every token (logits in float64, in row chunks), the
fused log-probs of --check-rows sampled tokens, dH on those rows and dW on --check-cols sampled
vocabulary columns against float64 (dz = g (onehot - p) / T from the float64 dL/dlog pi). A failed
check, or an error in any path, exits with status 1.
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
from infra import flags  # noqa: E402
fused = flags.fused_ops()  # kernels/fused_calibrl.py, loaded by path (kernels/ is no package)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEMPERATURE = 1.0


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
    with torch.no_grad():   # pi_old from the fused forward, moved a little so that ratios hit the clips
        old = fused.fused_logprobs(hidden.view(-1, h), weight, targets.view(-1), TEMPERATURE)[0].view(rows, T)
        b["old_logp"] = old + 0.2 * torch.randn(rows, T, device=DEV, generator=g)
    return hidden, weight, b


def step_naive(hidden, weight, b, algo="calibrl"):
    logits = hidden @ weight.T                                                     # (R, T, V) materialised
    logp = calibrl.token_logprobs(logits, b["targets"], TEMPERATURE)[0]
    loss, _ = calibrl.policy_loss(logp, b["old_logp"], b["advantages"], b["mask"], passed=b["passed"],
                                  expert_logp=b["expert_logp"], algo=algo)
    loss.backward()


def step_fused(hidden, weight, b, algo="calibrl"):
    loss, metrics = fused.fused_policy_loss(hidden, weight, b["targets"], b["old_logp"], b["mask"],
                                            advantages=b["advantages"], passed=b["passed"],
                                            expert_logp=b["expert_logp"], algo=algo, temperature=TEMPERATURE)
    loss.backward()
    return loss, metrics


def step_liger(hidden, weight, b, algo=None):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo")   # temperature 1
    out = fn(hidden, weight, b["targets"], b["mask"], b["advantages"], old_per_token_logps=b["old_logp"])
    (out[0] if isinstance(out, tuple) else out).backward()


STEPS = {"naive": step_naive, "fused": step_fused, "liger": step_liger}


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def run_once(step, hidden, weight, b, algo):
    hidden.grad = weight.grad = None
    sync()
    t0 = time.perf_counter()
    step(hidden, weight, b, algo)
    sync()
    return time.perf_counter() - t0


def grad_bytes(hidden, weight):
    return (hidden.numel() + weight.numel()) * hidden.element_size()


def peak_gpu(step, hidden, weight, b, algo):
    hidden.grad = weight.grad = None
    torch.cuda.empty_cache()
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(hidden, weight, b, algo)
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
    step(*make_inputs(64, 16, 256, 4, DTYPES[a.dtype]), a.algo)        # warm-up: imports, interpreter, allocator
    hidden, weight, b = make_inputs(a.n[0], a.h, a.v, a.rows, DTYPES[a.dtype])
    with open("/proc/self/clear_refs", "w") as f:   # Linux: reset the RSS high-water mark to the current RSS
        f.write("5")
    before = max_rss()
    step(hidden, weight, b, a.algo)
    after = max_rss()
    print(json.dumps({"peak": after - before - grad_bytes(hidden, weight)}))


def peak_cpu(name, n, a):
    cmd = [sys.executable, __file__, "--child", name, "--n", str(n)] + \
        [f"--{k}={getattr(a, k)}" for k in ("h", "v", "rows", "dtype", "threads", "algo")]
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


# -----------------------------------------------------------------------------
# The float64 check of what was timed

def check(hidden, weight, b, algo, n_rows, n_cols, dtype):
    """Fused loss / metrics / sampled log-probs, dH rows and dW columns against float64. -> ok."""
    R, T, H = hidden.shape
    N, V = R * T, weight.shape[0]
    loss, metrics = run_fused_for_check(hidden, weight, b, algo)
    dh, dw = hidden.grad.reshape(N, H).double(), weight.grad.double()
    h, w = hidden.detach().reshape(N, H), weight.detach().double()
    t = b["targets"].reshape(-1)
    # float64 log-probs of every token, a row chunk of logits at a time (<= 1 GB of float64 logits)
    lse, logp = torch.empty(N, dtype=torch.float64, device=DEV), torch.empty(N, dtype=torch.float64, device=DEV)
    step = max(1, 2 ** 27 // V)
    for r0 in range(0, N, step):
        z = (h[r0:r0 + step].double() @ w.T) / TEMPERATURE                        # (rows, V) float64
        lse[r0:r0 + step] = torch.logsumexp(z, dim=1)
        logp[r0:r0 + step] = z.gather(1, t[r0:r0 + step, None]).squeeze(1) - lse[r0:r0 + step]
        del z
    lp = logp.view(R, T).clone().requires_grad_()
    rloss, rmetrics = calibrl.policy_loss(lp, b["old_logp"].double(), b["advantages"].double(), b["mask"].double(),
                                          passed=b["passed"], expert_logp=b["expert_logp"].double(), algo=algo)
    rloss.backward()
    g = lp.grad.reshape(-1)                                                        # (N,) float64 dL/dlog pi
    gen = torch.Generator(device=DEV).manual_seed(1)
    rows = torch.randperm(N, device=DEV, generator=gen)[:n_rows]
    cols = torch.cat([t[rows[:n_cols // 2]], torch.randperm(V, device=DEV, generator=gen)[:n_cols - n_cols // 2]]).unique()
    with torch.no_grad():
        flogp = fused.fused_logprobs(h[rows], weight.detach(), t[rows], TEMPERATURE)[0]
        z = (h[rows].double() @ w.T) / TEMPERATURE                                 # (rows, V)
        dz = g[rows, None] * (torch.nn.functional.one_hot(t[rows], V).double() - (z - lse[rows, None]).exp())
        ref_dh = (dz / TEMPERATURE) @ w                                            # (rows, H)
        zc = (h.double() @ w[cols].T) / TEMPERATURE                                # (N, cols)
        dzc = g[:, None] * ((t[:, None] == cols[None, :]).double() - (zc - lse[:, None]).exp())
        ref_dw = (dzc / TEMPERATURE).T @ h.double()                                # (cols, H)
    lo = dtype == torch.float32
    tests = [("loss", loss, rloss, 1e-5, 1e-7), ("log-probs", flogp, logp[rows], 1e-5 if lo else 2e-5, 0),
             ("dH rows", dh[rows], ref_dh, 1e-4 if lo else 2e-2, 0), ("dW cols", dw[cols], ref_dw, 1e-4 if lo else 2e-2, 0)]
    tests += [(k, metrics[k], rmetrics[k], 1e-5, 1e-5) for k in rmetrics]
    ok = True
    for name, got, ref, rtol, atol in tests:
        got, ref = torch.as_tensor(got).detach().double(), torch.as_tensor(ref).detach().double()
        err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
        good = bool(torch.isfinite(got).all()) and err <= rtol * scale + atol
        ok &= good
        if not good or name in ("loss", "log-probs", "dH rows", "dW cols"):
            print(f"  check {name:20s} max|diff| {err:.2e}  max|ref| {scale:.2e}  tol {rtol:.0e}*max+{atol:.0e}  "
                  f"{'ok' if good else 'FAIL'}")
    return ok


def run_fused_for_check(hidden, weight, b, algo):
    hidden.grad = weight.grad = None
    loss, metrics = step_fused(hidden, weight, b, algo)
    return loss, metrics


# -----------------------------------------------------------------------------

def e2e(a):
    """2 training steps of calibrl.py on its tiny default model, fused on and off (run folders in /tmp)."""
    for fused_on in ("on", "off"):
        cmd = [sys.executable, "calibrl.py", "--fused", fused_on, "--dtype", a.dtype or "bfloat16", "--steps", "2",
               "--output-dir", tempfile.mkdtemp(prefix=f"bench-e2e-{fused_on}-")]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        print(f"$ python {' '.join(cmd[1:])}\n  rc={out.returncode}  wall {time.perf_counter() - t0:.1f} s")
        tail = out.stdout.strip().splitlines()[-3:] + (out.stderr.strip().splitlines()[-3:] if out.returncode else [])
        print("\n".join("  | " + line for line in tail))


def bench_shape(n, a, dtype):
    """Time and memory of each path at N = n, then the float64 check. -> ok."""
    print(f"\nN={n} H={a.h} V={a.v} R={a.rows} {a.dtype} algo={a.algo}")
    rate = matmul_rate(n, a.h, a.v, dtype)
    floor = 8 * n * a.h * a.v / rate
    print(f"matmul rate {rate / 1e12:.3f} TFLOP/s -> 8NHV floor {floor * 1e3:.2f} ms")
    hidden, weight, b = make_inputs(n, a.h, a.v, a.rows, dtype)
    results, ok = {}, True
    for name in a.paths.split(","):
        if name == "liger":
            try:
                import liger_kernel  # noqa: F401
            except ImportError:
                print(f"{name:6s} skipped: liger_kernel is not installed")
                continue
        try:
            for _ in range(a.warmup):
                run_once(STEPS[name], hidden, weight, b, a.algo)
            t = statistics.median(run_once(STEPS[name], hidden, weight, b, a.algo) for _ in range(a.repeats))
            mem = peak_gpu(STEPS[name], hidden, weight, b, a.algo) if DEV == "cuda" else peak_cpu(name, n, a)
        except Exception as e:   # e.g. the naive path out of memory: reported, and the run fails
            print(f"{name:6s} failed: {type(e).__name__}: {str(e)[:200]}")
            ok = False
            if DEV == "cuda":
                torch.cuda.empty_cache()
            continue
        results[name] = (t, mem)
    ref = results.get("naive")
    for name, (t, mem) in results.items():
        vs = f"  vs naive: time x{t / ref[0]:.2f}" if ref else ""
        vs += f"  mem x{mem / ref[1]:.3f}" if ref and ref[1] > 2**20 else ""
        print(f"{name:6s} {t * 1e3:10.2f} ms  {t / floor:8.2f} x floor  peak +{mem / 2**20:10.1f} MiB{vs}")
    if "fused" in a.paths.split(","):
        try:
            good = check(hidden, weight, b, a.algo, a.check_rows, a.check_cols, dtype)
        except Exception as e:
            print(f"check failed: {type(e).__name__}: {str(e)[:300]}")
            good = False
        print(f"check of the fused result at this shape: {'OK' if good else 'FAILED'}")
        ok &= good
    del hidden, weight, b
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[256], help="tokens N (= rows * T); several values: one run each")
    p.add_argument("--h", type=int, default=64, help="hidden size H")
    p.add_argument("--v", type=int, default=512, help="vocab size V")
    p.add_argument("--rows", type=int, default=8, help="rows R (T = N / R)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="default: float32 on the CPU, bfloat16 on a GPU and for --e2e")
    p.add_argument("--algo", default="calibrl", choices=["calibrl", "grpo", "luffy", "rlplus"])
    p.add_argument("--paths", default="naive,fused,liger", help="comma-separated subset of naive,fused,liger")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3 if DEV == "cpu" else 5)
    p.add_argument("--check-rows", type=int, default=64, help="sampled tokens for the log-prob and dH check")
    p.add_argument("--check-cols", type=int, default=64, help="sampled vocabulary columns for the dW check")
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
    print(f"device {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu (Triton interpreter)'}  "
          f"torch {torch.__version__}")
    ok = all([bench_shape(n, a, DTYPES[a.dtype]) for n in a.n])
    print("\nALL OK" if ok else "\nSOME PATH OR CHECK FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
