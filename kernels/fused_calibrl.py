"""
fused_calibrl.py -- the LM head, log-softmax and CalibRL loss without materialising the logits.

    from kernels import fused_logprobs, fused_policy_loss
    logp, ent = fused_logprobs(hidden, weight, targets, temperature)          # pi_old, l^E, pi_theta
    loss, metrics = fused_policy_loss(hidden, head, targets, old_logp, mask, advantages=A, passed=ok,
                                      expert_logp=lE, expert_rows=is_exp, num_tokens=n_minibatch)

Why fuse: log pi(y_t) for N response tokens needs logits z = hidden @ W^T of shape (N, V). At the
Qwen2.5-VL-3B shape (N = 32768, H = 2048, V = 151936) fp32 logits are 19.9 GB and a naive
log-softmax + backward holds two or three such buffers. Here the forward streams (BLOCK_N x BLOCK_V)
tiles of z through an online log-sum-exp (three running floats per token) and saves two floats per
token; the backward recomputes the tiles. Compute is the floor: 2NHV forward + 2NHV recompute + 4NHV for dH and dW = 8NHV FLOPs, and
the op is compute-bound (about 2 GB of unavoidable traffic).

Shapes: N tokens (= R rows x T response positions, flattened), H hidden, V vocab, VC vocab chunk.
s = z / T is the tempered logit, p = softmax(s), lse = log sum_j exp(s_j), ent = -sum_j p_j log p_j.

Saved vs recomputed: the forward saves lse and ent per token (fp32, N each) next to hidden and W.
The backward recomputes z tile by tile, turns it into dL/dz for one vocab chunk of VC columns
(all tokens; VC is sized so that this chunk stays near 256 MB), then runs two GEMMs per chunk:
dW[chunk] = dz^T @ hidden (one GEMM over all tokens: fp32 accumulate, written once in W's dtype)
and dH += dz @ W[chunk] (fp32 output into an fp32 (N, H) accumulator). So every gradient element is
accumulated in fp32 and no fp32 (V, H) buffer exists.

Departures from the reference path (calibrl.token_logprobs / policy_loss on materialised logits):
 1. z is accumulated in fp32 from the dtype of hidden/W (the reference upcasts bf16 logits after a
    bf16 GEMM, i.e. rounds z to bf16 first); fp32 inputs use full-precision dots (no TF32).
 2. dL/dz is rounded to the dtype of hidden/W before the two backward GEMMs (as in every fused
    linear loss); the upstream gradients are first scaled by a power of two so that fp16 does
    not underflow; the power of two is exact to undo.
 3. Padding tokens (mask == 0) never reach the head, and rows whose upstream gradient is exactly 0
    (masked, or A = 0) are skipped in the backward. Neither changes any value or gradient.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # CPU tensors run through Triton's numpy interpreter
CHUNK_ELEMS = 2 ** 27   # dL/dz chunk budget in elements: 256 MB in bf16 (VC = 4096 at N = 32768)
NEG = tl.constexpr(-1e30)  # "minus infinity" that keeps 0 * NEG = 0 in the online updates (no nan)


# -----------------------------------------------------------------------------
# Kernels

@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """z[rows, cols] = hidden[rows] @ W[cols]^T, (BLOCK_N, BLOCK_V) fp32; int64 offsets."""
    z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        h = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * H + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is broken: compute it in fp32 there
            h, w = h.to(tl.float32), w.to(tl.float32)
        z = tl.dot(h, w, z, input_precision=PRECISION)                          # (BLOCK_N, BLOCK_V)
    return z


@triton.jit
def _logprobs_fwd_kernel(
    h_ptr,      # (N, H) hidden states, row-major, bf16 / fp16 / fp32
    w_ptr,      # (V, H) LM head, same dtype, row-major
    tgt_ptr,    # (N,) int64 target token ids
    logp_ptr,   # (N,) fp32 out: log pi(target) = s_target - lse
    ent_ptr,    # (N,) fp32 out: entropy of pi
    lse_ptr,    # (N,) fp32 out: log-sum-exp of s, saved for the backward
    N, V, H,    # sizes
    INV_T: tl.constexpr,                                                     # 1 / temperature
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # one program = BLOCK_N tokens; it streams over all of V keeping, per token, the running max m,
    # d = sum exp(s - m) and a = sum exp(s - m) (s - m). Then lse = m + log d and
    # ent = lse - E[s] = log d - a / d, which avoids subtracting two large numbers.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=0)
    m = tl.full((BLOCK_N,), NEG, tl.float32)
    d = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    s_tgt = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        s = tl.where(col_ok[None, :], z * INV_T, NEG)                          # (BLOCK_N, BLOCK_V)
        s_tgt += tl.sum(tl.where(cols[None, :] == tgt[:, None], s, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        scale = tl.exp(m - m_new)
        e = tl.exp(s - m_new[:, None])                                          # 0 on padded columns
        # rescale the old sums to the new max: sum e^(s-m_new)(s-m_new) = scale * (a + d (m - m_new)) + ...
        a = scale * (a + d * (m - m_new)) + tl.sum(e * (s - m_new[:, None]), axis=1)
        d = scale * d + tl.sum(e, axis=1)
        m = m_new
    lse = m + tl.log(d)
    tl.store(logp_ptr + rows, s_tgt - lse, mask=row_ok)
    tl.store(ent_ptr + rows, tl.log(d) - a / d, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _logprobs_bwd_kernel(
    h_ptr,      # (N, H) hidden states (only the rows with a gradient)
    w_ptr,      # (V, H) LM head
    tgt_ptr,    # (N,) int64 target ids
    lse_ptr,    # (N,) fp32 saved log-sum-exp
    ent_ptr,    # (N,) fp32 saved entropy
    g_ptr,      # (N,) fp32 upstream dL/dlogp, pre-scaled by a power of two
    gh_ptr,     # (N,) fp32 upstream dL/dent, same scale (unused unless HAS_GH)
    dz_ptr,     # (N, VC) out: dL/dz for vocab columns [v0, v0 + VC), row-major, dtype of hidden
    N, H, v0, VC,
    INV_T: tl.constexpr, HAS_GH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # With log p_j = s_j - lse and s = z / T:
    #   d logp / d s_j = onehot_j - p_j
    #   d ent  / d s_j = -p_j (log p_j + ent)          (= -p_j (s_j - E[s]))
    # so  dz_j = [ g (onehot_j - p_j) - g_ent p_j (log p_j + ent) ] / T.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = v0 + tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < v0 + VC
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    logp = z * INV_T - lse[:, None]                                             # (BLOCK_N, BLOCK_V)
    p = tl.exp(logp)
    dz = g[:, None] * (tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0) - p)
    if HAS_GH:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        gh = tl.load(gh_ptr + rows, mask=row_ok, other=0.0)
        dz -= gh[:, None] * p * (logp + ent[:, None])
    dz = dz * INV_T
    out = dz_ptr + rows[:, None] * VC + (cols - v0)[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# -----------------------------------------------------------------------------
# Host launchers

def _config(dtype):
    """One fixed block config per target (autotuning is kept off the reading path).
    The interpreter's cost is per operation, so it gets few large blocks."""
    precision = "ieee" if dtype == torch.float32 else "tf32"   # "tf32" is ignored for 16-bit inputs
    if INTERPRET:
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, UPCAST=dtype == torch.bfloat16, PRECISION=precision)
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=32 if dtype == torch.float32 else 64,
                UPCAST=False, PRECISION=precision, num_warps=8, num_stages=3)


def _check(hidden, weight):
    assert hidden.dtype == weight.dtype, f"hidden {hidden.dtype} and weight {weight.dtype} must match"
    assert hidden.shape[1] == weight.shape[1], "hidden (N, H) and weight (V, H)"
    if not hidden.is_cuda and not INTERPRET:
        raise RuntimeError("CPU tensors need TRITON_INTERPRET=1 set before triton is imported")


def _mm_fp32(a, b):
    """a @ b accumulated and returned in fp32: on CUDA a 16-bit cuBLAS GEMM with fp32 output (torch >= 2.8)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()   # CPU: tests only


def _fwd(hidden, weight, targets, inv_t):
    N, H = hidden.shape
    V = weight.shape[0]
    logp, ent, lse = (torch.empty(N, device=hidden.device, dtype=torch.float32) for _ in range(3))
    cfg = _config(hidden.dtype)
    if N:   # an all-padding micro-batch has no token to score
        grid = (triton.cdiv(N, cfg["BLOCK_N"]),)
        _logprobs_fwd_kernel[grid](hidden, weight, targets, logp, ent, lse, N, V, H, INV_T=inv_t, **cfg)
    return logp, ent, lse


def _bwd(hidden, weight, targets, lse, ent, g, gh, inv_t, need_dh, need_dw):
    N, H = hidden.shape
    V = weight.shape[0]
    g = torch.zeros_like(lse) if g is None else g.float()
    live = (g != 0) if gh is None else (g != 0) | (gh != 0)    # (N,) rows that carry a gradient
    idx = live.nonzero().squeeze(1)                             # one host sync; skips masked and A = 0 rows
    n = idx.numel()
    gh = None if gh is None else gh.float()
    h, tgt = hidden, targets
    if n < N:
        h, tgt, lse, ent, g = hidden[idx], targets[idx], lse[idx], ent[idx], g[idx]
        gh = None if gh is None else gh[idx]
    # scale the upstream gradients to max 1 by a power of two (exact): keeps fp16 dz out of subnormals
    gmax = g.abs().max() if n else g.new_ones(())
    if gh is not None and n:
        gmax = torch.maximum(gmax, gh.abs().max())
    scale = torch.exp2(torch.ceil(torch.log2(gmax.clamp(min=1e-30))))
    g = g / scale
    gh = None if gh is None else gh / scale
    dh = torch.zeros(n, H, device=hidden.device, dtype=torch.float32) if need_dh else None  # fp32 accumulator
    dw = torch.zeros_like(weight) if need_dw else None
    cfg = _config(hidden.dtype)
    vc = max(cfg["BLOCK_V"], CHUNK_ELEMS // max(n, 1) // cfg["BLOCK_V"] * cfg["BLOCK_V"])
    buf = torch.empty(n * min(vc, V), device=hidden.device, dtype=hidden.dtype)
    for v0 in range(0, V if n else 0, vc):
        c = min(vc, V - v0)
        dz = buf[: n * c].view(n, c)                                            # (n, c) one chunk of dL/dz
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(c, cfg["BLOCK_V"]))
        _logprobs_bwd_kernel[grid](h, weight, tgt, lse, ent, g, g if gh is None else gh, dz,
                                   n, H, v0, c, INV_T=inv_t, HAS_GH=gh is not None, **cfg)
        if need_dw:   # one GEMM over all tokens, fp32 output (no reduced-precision split-K), stored once in W's dtype
            dw[v0:v0 + c] = _mm_fp32(dz.T, h) * scale
        if need_dh:   # accumulated across chunks in fp32
            dh += _mm_fp32(dz, weight[v0:v0 + c])
    if need_dh:
        dh = (dh * scale).to(hidden.dtype)
        if n < N:
            dh = torch.zeros_like(hidden).index_copy_(0, idx, dh)
    return dh, dw


class FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature):
        _check(hidden, weight)
        hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous().long()
        inv_t = 1.0 / float(temperature)   # a constexpr: stays fp32 in the kernel, also under torch.compile
        logp, ent, lse = _fwd(hidden, weight, targets, inv_t)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.inv_t = inv_t
        ctx.set_materialize_grads(False)   # an unused entropy gets g_ent = None: its term is skipped
        return logp, ent

    @staticmethod
    def backward(ctx, g, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        dh, dw = _bwd(hidden, weight, targets, lse, ent, g, g_ent, ctx.inv_t,
                      ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dh, dw, None, None


def fused_logprobs(hidden, weight, targets, temperature=1.0):
    """hidden (N, H), weight (V, H) same dtype, targets (N,) -> fp32 log pi(target), entropy (N,) each.
    Both outputs are differentiable w.r.t. hidden and weight."""
    return FusedLogprobs.apply(hidden, weight, targets, temperature)


# -----------------------------------------------------------------------------
# The loss on the (R, T) vectors: calibrl.policy_loss itself (cheap elementwise torch); autograd
# hands dL/dlogp to the kernel's backward.

def _group_advantages(rewards, group_ids, expert_rows, std_normalize, eps=1e-6):
    """Eq. A with arbitrary group ids: A = (r - mean of the group's on-policy r) [/ (std + eps)].
    Expert rows get A_E = (r_E - mu) [/ (std + eps)]; std needs 2 on-policy rows (else 1).
    -> advantages (R,), passed (R,) bool (accuracy 1 <=> r > 0.5)."""
    r = rewards.float()
    on = torch.ones_like(r) if expert_rows is None else (~expert_rows.bool()).float()
    gid = torch.unique(group_ids, return_inverse=True)[1]                        # (R,) in 0..P-1
    P = int(gid.max()) + 1
    n = r.new_zeros(P).index_add_(0, gid, on)                                    # (P,) on-policy count
    mu = r.new_zeros(P).index_add_(0, gid, r * on) / n.clamp(min=1)              # (P,)
    adv = r - mu[gid]
    if std_normalize:
        var = r.new_zeros(P).index_add_(0, gid, adv.square() * on) / (n - 1).clamp(min=1)  # unbiased
        adv = adv / torch.where(n > 1, var.sqrt() + eps, torch.ones_like(var))[gid]
    return adv, rewards > 0.5   # a lone on-policy row is its own mean: A = 0 exactly (decision 5)


def fused_policy_loss(hidden, weight, targets, old_logp, mask, rewards=None, group_ids=None, *,
                      advantages=None, passed=None, algo="calibrl", expert_logp=None, expert_rows=None,
                      temperature=1.0, std_normalize=False, clip_low=0.2, clip_high=0.2, clip_c=3.0,
                      alpha=0.5, lam=0.1, num_tokens=None):
    """hidden (R, T, H), weight (V, H); targets/old_logp/mask/expert_logp (R, T);
    rewards/group_ids/expert_rows/advantages/passed (R,). Give rewards + group_ids (Eq. A inside) or
    advantages + passed. Returns (loss, metrics) equal to calibrl.policy_loss on
    token_logprobs(hidden @ weight.T, targets, temperature)[0]; differentiable w.r.t. hidden, weight."""
    R, T, H = hidden.shape
    if advantages is None:
        advantages, passed = _group_advantages(rewards, group_ids, expert_rows, std_normalize)
    valid = mask.reshape(-1) > 0                                                  # (R*T,) only these reach the head
    logp_v, _ = fused_logprobs(hidden.reshape(R * T, H)[valid], weight, targets.reshape(-1)[valid], temperature)
    logp = torch.zeros(R * T, device=hidden.device, dtype=torch.float32).masked_scatter(valid, logp_v).view(R, T)
    from calibrl import policy_loss  # the one definition of Eq. C: cheap elementwise work on (R, T)
    return policy_loss(logp, old_logp.float(), advantages.float(), mask.float(), algo=algo, passed=passed,
                       expert_logp=None if expert_logp is None else expert_logp.float(), expert_rows=expert_rows,
                       clip_low=clip_low, clip_high=clip_high, clip_c=clip_c, alpha=alpha, lam=lam,
                       num_tokens=num_tokens)
