"""
sweep.py -- GPU checks of the fused kernel beyond bench.py, kept off the reading path.

    python kernels/sweep.py check     # full vocabulary, bf16, vs float64: log-probs, entropy, dH, dW
    python kernels/sweep.py sweep     # forward configs and splits, backward grid order, dH accumulation
    python kernels/sweep.py compile   # no GPU needed: every kernel variant compiled for sm_90a
    python kernels/sweep.py check --n 96 --h 48 --v 700 --dtype float32 --chunk-elems 4096    # CPU smoke
    python kernels/sweep.py sweep --n 256 --h 64 --v 512 --dtype float32                      # CPU smoke

check: fused_logprobs at V = 151,936 with gradients of log pi and of the entropy (every third row
without either: skipped in the backward), a flat and a peaked distribution (the second with
temperature 0.7 and Qwen's five vision ids suppressed), several backward chunks with a ragged last
one, against float64 autograd. sweep: times the two head kernels alone for a few block
configurations and split counts (the reading path keeps one, see _config), checks that the
backward's vocab-fastest grid gives dz bit-identical to the rows-first one and times both, and times
dH += dz @ W[chunk] in place (addmm into fp32) against row slices through an fp32 temporary.
compile: the reading-path configuration of every kernel compiled for sm_90a with the ptxas that
ships with triton (no GPU), registers / stack / shared memory per variant: a spill shows as STACK.
Exit status 1 when a check fails.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import calibrl  # noqa: E402  (TRITON_INTERPRET=1 without CUDA, before triton is imported)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from infra import flags  # noqa: E402
fc = flags.fused_ops()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
VISION_IDS = [151652, 151653, 151654, 151655, 151656]   # Qwen2.5-VL vision start / end / pad, image / video pad


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps=5):
    fn()
    sync()
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def check(a):
    dt = getattr(torch, a.dtype)
    fc.CHUNK_ELEMS = a.chunk_elems
    ok = True
    for case, std, temp, ids in [("flat", 1.1, 1.0, None), ("peaked+suppress", 4.0, 0.7, VISION_IDS)]:
        ids = None if ids is None else [i for i in ids if i < a.v] or [a.v - 1]
        g = torch.Generator(device=DEV).manual_seed(0)
        h = torch.randn(a.n, a.h, device=DEV, generator=g).to(dt)
        w = (torch.randn(a.v, a.h, device=DEV, generator=g) * (std / a.h ** 0.5)).to(dt)
        t = torch.randint(0, a.v, (a.n,), device=DEV, generator=g)
        if ids is not None:
            t = torch.where(torch.isin(t, torch.tensor(ids, device=DEV)), 0, t)
        g1 = torch.randn(a.n, device=DEV, generator=g, dtype=torch.float64)
        g2 = torch.randn(a.n, device=DEV, generator=g, dtype=torch.float64)
        g1[::3] = g2[::3] = 0
        hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
        logp, ent = fc.fused_logprobs(hf, wf, t, temp, suppress_ids=ids)
        (logp.double() * g1 + ent.double() * g2).sum().backward()
        hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
        z = (hd @ wd.T)
        if ids is not None:
            z = z.index_fill(1, torch.tensor(ids, device=DEV), -1e30)
        lsm = torch.log_softmax(z / temp, dim=-1)                                    # float64 throughout
        rlogp, rent = lsm.gather(1, t[:, None]).squeeze(1), -(lsm.exp() * lsm).sum(1)
        (rlogp * g1 + rent * g2).sum().backward()
        del lsm, z
        tol = 1e-5 if dt == torch.float32 else 2e-2
        for name, got, ref, rtol in [("logp", logp, rlogp, 1e-5), ("entropy", ent, rent, 1e-5),
                                     ("dH", hf.grad, hd.grad, tol), ("dW", wf.grad, wd.grad, tol)]:
            err, sc = (got.double() - ref.detach()).abs().max().item(), ref.detach().abs().max().item()
            good = bool(torch.isfinite(got).all()) and err <= rtol * sc
            ok &= good
            print(f"{case:16s} {name:8s} max|err| {err:.3e} / max|ref| {sc:.3e} = {err / max(sc, 1e-30):.2e} "
                  f"(tol {rtol:.0e}) {'OK' if good else 'FAIL'}")
        skipped = bool((hf.grad[::3] == 0).all())
        sup_zero = ids is None or bool((wf.grad[ids] == 0).all())
        ok &= skipped and sup_zero
        print(f"{case:16s} dH zero on rows without gradient: {skipped}; dW zero on suppressed ids: {sup_zero}")
        del hd, wd, hf, wf
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return ok


@triton.jit
def _bwd_rows_first(h, w, tgt, lse, g, ent, gh, sup, dz, N, H, stride_h, v0, VC, INV_T: tl.constexpr,
                    HAS_GH: tl.constexpr, HAS_SUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """The first landing's grid order: token blocks on axis 0, vocab tiles on axis 1."""
    fc._dz_tile(tl.program_id(0), tl.program_id(1), h, w, tgt, lse, g, ent, gh, sup, dz, N, H, stride_h, v0, VC,
                INV_T, HAS_GH, HAS_SUP, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)


def sweep(a):
    dt = getattr(torch, a.dtype)
    N, H, V = a.n, a.h, a.v
    h = (torch.randn(N, H, device=DEV) * 0.5).to(dt)
    w = (torch.randn(V, H, device=DEV) * 0.05).to(dt)
    t = torch.randint(0, V, (N,), device=DEV)
    flop = 2 * N * H * V
    base, reading_path_config = fc._config(dt), fc._config
    ok = True
    # forward: block configurations x split counts (bit-identity is not expected across splits: the merge
    # order changes rounding; the log-probs must agree to 1e-5)
    ref = fc._head_fwd(h, None, w, t, 1.0, None)[1]
    configs = [dict(), dict(num_stages=4), dict(BLOCK_H=128, num_stages=2), dict(BLOCK_V=256), dict(BLOCK_N=64, num_warps=4)]
    for change in configs:
        for splits in sorted({base["SPLITS"], 1, 4, 16}):
            cfg = {**base, **change, "SPLITS": splits}
            if DEV == "cpu" and ("num_warps" in change or "num_stages" in change):
                continue
            fc._config = lambda dtype, cfg=cfg: cfg
            tag = f"fwd {cfg['BLOCK_N']}x{cfg['BLOCK_V']}x{cfg['BLOCK_H']} w{cfg.get('num_warps', '-')} " \
                  f"s{cfg.get('num_stages', '-')} S={splits}"
            try:
                sec = timed(lambda: fc._head_fwd(h, None, w, t, 1.0, None), a.reps)
                err = (fc._head_fwd(h, None, w, t, 1.0, None)[1] - ref).abs().max().item()
                good = err <= 1e-5 * ref.abs().max().item()
                ok &= good
                print(f"{tag:34s} {sec * 1e3:9.2f} ms {flop / sec / 1e12:7.1f} TFLOP/s  logp max|diff| {err:.1e} "
                      f"{'' if good else 'FAIL'}")
            except Exception as e:
                print(f"{tag:34s} failed: {type(e).__name__}: {str(e)[:150]}")
    fc._config = reading_path_config
    # backward dz kernel, one chunk of VC columns over all N tokens: vocab-fastest vs rows-first grid
    lse, _, ent, _, _ = fc._head_fwd(h, None, w, t, 1.0, None)
    g = torch.randn(N, device=DEV)
    cfg = fc._tile_cfg(base)
    vc = min(V, max(base["BLOCK_V"], fc.CHUNK_ELEMS // N // base["BLOCK_V"] * base["BLOCK_V"]))
    dz = {k: torch.empty(N, vc, device=DEV, dtype=dt) for k in ("vocab", "rows")}
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    runs = {"vocab": lambda: fc._head_bwd_kernel[(triton.cdiv(vc, bv), triton.cdiv(N, bn))](
                h, w, t, lse, g, ent, g, t, dz["vocab"], N, H, H, 0, vc, INV_T=1.0, HAS_GH=False, HAS_SUP=False, **cfg),
            "rows": lambda: _bwd_rows_first[(triton.cdiv(N, bn), triton.cdiv(vc, bv))](
                h, w, t, lse, g, ent, g, t, dz["rows"], N, H, H, 0, vc, INV_T=1.0, HAS_GH=False, HAS_SUP=False, **cfg)}
    secs = {k: timed(f, a.reps) for k, f in runs.items()}
    same = torch.equal(dz["vocab"], dz["rows"])
    ok &= same
    print(f"bwd dz chunk VC={vc}: vocab-fastest {secs['vocab'] * 1e3:.3f} ms "
          f"({2 * N * H * vc / secs['vocab'] / 1e12:.1f} TFLOP/s), rows-first {secs['rows'] * 1e3:.3f} ms "
          f"({2 * N * H * vc / secs['rows'] / 1e12:.1f} TFLOP/s); dz bit-identical: {same}")
    # dH += dz @ W[chunk] with fp32 accumulation: in place (newer torch) vs row slices + add
    acc = {k: torch.zeros(N, H, device=DEV, dtype=torch.float32) for k in ("inplace", "slices")}
    wc = w[:vc]

    def slices():
        step = max(1, fc.DH_SLICE_ELEMS // H)
        for r0 in range(0, N, step):
            acc["slices"][r0:r0 + step] += fc._mm_fp32(dz["vocab"][r0:r0 + step], wc)
    try:
        t_in = timed(lambda: fc._addmm_fp32_(acc["inplace"], dz["vocab"], wc), a.reps)
        print(f"dH accumulate: _addmm_fp32_ {t_in * 1e3:.3f} ms (in place: {fc._ADDMM_INTO_FP32 and dt != torch.float32 and DEV == 'cuda'})")
    except Exception as e:
        print(f"dH accumulate in place failed: {type(e).__name__}: {str(e)[:150]}")
        ok = False
    t_sl = timed(slices, a.reps)   # both accumulators received reps + 1 products
    err = (acc["inplace"] - acc["slices"]).abs().max().item() / max(acc["slices"].abs().max().item(), 1e-30)
    ok &= err < 1e-5
    print(f"dH accumulate: row slices + add {t_sl * 1e3:.3f} ms; relative max|diff| of the two: {err:.1e}")
    return ok


def compile_sm90(a):
    """Every kernel variant at the reading-path config, compiled for sm_90a without a GPU."""
    if fc.INTERPRET:   # the kernels must be JIT functions, not interpreted ones: a fresh process
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
        return subprocess.run([sys.executable, __file__, "compile"], env=env).returncode == 0
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    aligned = {"H", "V", "stride_h", "VS", "VC", "v0"}   # runtime-specialised as multiples of 16 here

    def build(fn, dt, consts, opts):
        def kind(name):
            if name in consts:
                return "constexpr"
            if not name.endswith("_ptr"):
                return "i32"
            return {"h": dt, "w": dt, "dz": dt, "hrow": "*i64", "tgt": "*i64", "row": "*i64", "gid": "*i64",
                    "sup": "*i8", "pass": "*i8", "exp": "*i8"}.get(name[:-4], "*fp32")
        sig = {name: kind(name) for name in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if sig[name].startswith("*") or name in aligned}
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        use = next((line.split("TEXTURE")[0].strip() for line in out.splitlines() if "REG:" in line), out)
        return k.metadata.shared, use

    rows = []
    for dt, dtype in (("*bf16", torch.bfloat16), ("*fp32", torch.float32)):
        cfg = fc._config(dtype)
        tile = {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H", "UPCAST", "PRECISION")}
        opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        for rows_, sup in ((False, False), (True, True)):
            rows.append((f"_head_fwd_kernel {dt[1:]} HAS_ROWS={rows_} HAS_SUP={sup}", fc._head_fwd_kernel, dt,
                         dict(INV_T=1.0, HAS_ROWS=rows_, HAS_SUP=sup, **tile), opts))
        for gh in (False, True):
            rows.append((f"_head_bwd_kernel {dt[1:]} HAS_GH={gh}", fc._head_bwd_kernel, dt,
                         dict(INV_T=1.0, HAS_GH=gh, HAS_SUP=True, **tile), opts))
    for algo in fc.ALGOS.values():
        rows.append((f"_loss_fwd_kernel ALGO={algo}", fc._loss_fwd_kernel, "*fp32",
                     dict(LOSS=True, ALGO=algo, CLIP_LOW=0.2, CLIP_HIGH=0.2, CLIP_C=3.0, ALPHA=0.5, LAM=0.1,
                          BLOCK_M=fc._config(torch.bfloat16)["BLOCK_M"]), dict(num_warps=4)))
    blk = fc._config(torch.float32)["BLOCK_R"]
    rows.append(("_advantages_fwd_kernel STD=True", fc._advantages_fwd_kernel, "*fp32",
                 dict(STD=True, EPS=1e-6, BLOCK_I=blk, BLOCK_J=blk), dict(num_warps=4)))
    ok = True
    for tag, fn, dt, consts, opts in rows:
        try:
            shared, use = build(fn, dt, consts, opts)
            spill = "STACK:0 " not in use + " "
            ok &= not spill
            print(f"{tag:48s} shared {shared:6d} B  {use}{'  SPILLS' if spill else ''}")
        except Exception as e:
            ok = False
            print(f"{tag:48s} failed: {type(e).__name__}: {str(e)[:300]}")
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["check", "sweep", "compile"])
    p.add_argument("--n", type=int, default=None, help="tokens (check: 2048, sweep: 32768)")
    p.add_argument("--h", type=int, default=2048)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--chunk-elems", type=int, default=2048 * 4096, help="check: backward chunk budget (38 chunks at N = 2048)")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    a.n = a.n or (2048 if a.what == "check" else 32768)
    if a.what == "compile":
        print("offline compile for sm_90a" + ("" if fc.INTERPRET else ": reading-path configs"))
    else:
        print(f"device {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu (Triton interpreter)'}  "
              f"{a.what} N={a.n} H={a.h} V={a.v} {a.dtype}")
    ok = {"check": check, "sweep": sweep, "compile": compile_sm90}[a.what](a)
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
