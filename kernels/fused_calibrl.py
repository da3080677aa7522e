"""
fused_calibrl.py -- the LM head, log-softmax, Eq. A and the CalibRL loss (Eq. C) in Triton, without
materialising the logits. Loaded by path (kernels/ is no package): `infra.flags.fused_ops()`.

    logp, ent = fused.fused_logprobs(hidden, W, targets, temperature)    # pi_old, l^E, entropy
    loss, metrics = fused.fused_policy_loss(hidden, W, targets, old_logp, mask, rewards, group_ids,
                                            expert_logp=lE, expert_rows=is_exp, num_tokens=n)
    loss, metrics = fused.fused_policy_loss_tokens(h, W, tgt, old, row_ids, lE, advantages=A,
                                                   passed=ok, expert_rows=is_exp)  # packed
    adv, passed = fused.fused_group_advantages(rewards, group_ids, expert_rows, std_normalize)

Shapes: R rows (responses; a group = the rows of one prompt, the expert row included), T response
positions, N tokens, H hidden, V vocab, S vocab splits of the forward, VC vocab columns of one
backward chunk. hidden[r, t] is the state whose logits predict token targets[r, t] (the caller
already shifted by one). s = z / temperature are the tempered logits z = hidden @ W^T, p =
softmax(s), lse = log sum_j exp(s_j), ent = -sum_j p_j log p_j.

Entry points. `fused_policy_loss_tokens` is the packed form: N valid tokens only, hidden (N, H),
targets / old_logp / expert_logp / row_ids (N,), where row_ids maps each token to its row and the
per-row vectors (rewards, group_ids or advantages, passed, expert_rows) are (R,). The loss is the
sum over counted tokens of the Eq. C terms / num_tokens (default: the counted tokens of this call),
with the metrics of calibrl.policy_loss. `fused_policy_loss` takes hidden (R, T, H) and an (R, T)
mask and wraps it: it hands over the valid tokens by index, without copying hidden (also when hidden
is a strided slice such as h[:, L-1:-1]). `suppress_ids` are token ids the sampler can never produce
(Qwen's vision tokens): their logits count as -inf everywhere (log-softmax, entropy, gradient), so
pi_old and the update score exactly the sampler's distribution.

What runs where. Forward: `_head_fwd_kernel` runs a (vocab split x token block) grid, each program
streaming (BLOCK_N x BLOCK_V) logit tiles of its split through an online max / sum-exp / entropy sum
and picking the target logit; `_loss_fwd_kernel` merges the S partials per token (lse, log pi,
entropy) and, in the same pass, evaluates Eq. C and its derivative dL/dlog pi (the loss is
elementwise in log pi), plus per-block sums for the loss and the metrics. Saved for the backward:
lse and dL/dlog pi (fp32, N each). Backward: `_head_bwd_kernel` recomputes the logits of one vocab
chunk for all tokens with a gradient and writes dL/dz; two cuBLAS GEMMs follow per chunk: dW[chunk]
= dz^T @ hidden over all tokens (fp32 accumulate, written once in W's dtype) and dH += dz @ W[chunk]
into an fp32 (n, H) accumulator. No fp32 (V, H) buffer exists. Eq. A is `_advantages_fwd_kernel`.

Memory traffic at the Qwen2.5-VL-3B head shape (N = 32768, H = 2048, V = 151936, bf16). The FLOP
floor is 8NHV = 81.6 TFLOP (2NHV forward, 2NHV logits recomputed, 2NHV each for dH and dW), about
103 ms at the ~790 TFLOP/s an H200 sustains on dense bf16. The compulsory HBM traffic is 2.3 GB
(hidden 0.13 GB and W 0.62 GB read twice, dH and dW written once): that is the floor, not this
design, which moves about 76 GB (estimated from the tiling, not measured): forward ~9.8 GB (each W
tile is read from HBM once per ~16 concurrent token blocks, 256 / 16.5 = 15.5 passes over W, while
the blocks' hidden stays in L2); backward ~66 GB, of which dz is 10 GB written and 20 GB read back
by the two GEMMs, hidden is re-read once per vocab chunk (38 chunks: 5 GB for the dz kernel, 5 GB
for the dW GEMMs) and the fp32 dH accumulator is read and written once per chunk (20 GB; 41 GB where
torch cannot addmm into it in place). Every kernel stays above 650 FLOP per HBM byte (forward
~2,100, dz ~1,300, dW ~1,100, dH ~660) against the H200's ridge of ~165 (790 TFLOP/s / 4.8 TB/s), so
each is compute-bound; the tiles' L2-to-SM traffic (~320 GB per pass at 128 x 128 tiles) is what
larger tiles would cut. Extra memory: dz chunk 256 MB + dH accumulator 256 MB + a 32 MB dW chunk in
fp32 (+ 32 MB dH row slices without the in-place addmm), ~0.55 GB above the inputs and the returned
gradients.

Departures from the readable path (calibrl.token_logprobs / group_advantages / policy_loss):
 1. z is accumulated in fp32 from the dtype of hidden / W (the readable path rounds bf16 logits to
    bf16 after a bf16 GEMM); fp32 inputs use full-precision dots (no TF32).
 2. dL/dz is rounded to the dtype of hidden / W before the two backward GEMMs (as in every fused
    linear loss); the upstream gradients are first scaled by a power of two (exact to undo) so that
    fp16 does not underflow.
 3. Padding tokens never reach the head, and tokens whose dL/dlog pi is exactly 0 (expert rows under
    CalibRL / GRPO, A = 0) are skipped in the backward. Neither changes a value or a gradient.
 4. The mask is 0/1: a token with mask > 0 counts once (the readable loss multiplies by its value).
 5. Eq. A runs in fp32 on arbitrary group ids. The group mean is r_1 + mean(r - r_1), r_1 the
    group's first on-policy reward, so a group of equal rewards gets A = 0 exactly and its expert row
    A_E = r_E - r exactly (with std too: a group with no spread is not rescaled, as in calibrl).
    A group without on-policy rows: mu = 0.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # CPU tensors: Triton's numpy interpreter
CHUNK_ELEMS = 2 ** 27   # dL/dz chunk budget in elements: 256 MB in bf16 (VC = 4096 at N = 32768)
DH_SLICE_ELEMS = 2 ** 23   # 32 MB fp32 dH row slice, where addmm cannot accumulate in place
NEG = tl.constexpr(-1e30)  # "minus infinity" that keeps 0 * NEG = 0 in the online updates (no nan)
ALGOS = {"calibrl": 0, "grpo": 1, "luffy": 2, "rlplus": 3}
STATS = ("loss", "counted", "on", "clip", "dualclip", "ratio", "ppo", "guided", "kl", "max_dev")


# -----------------------------------------------------------------------------
# Eq. A: group-normalised advantages

@triton.jit
def _same_group(gi, gid_ptr, exp_ptr, j, R):
    """(BLOCK_I, BLOCK_J) bool: row j is an on-policy row of row i's group."""
    gj = tl.load(gid_ptr + j, mask=j < R, other=-1)
    ej = tl.load(exp_ptr + j, mask=j < R, other=1)
    return (gi[:, None] == gj[None, :]) & (ej == 0)[None, :] & (j < R)[None, :]


@triton.jit
def _advantages_fwd_kernel(
    r_ptr,      # (R,) fp32 rewards
    gid_ptr,    # (R,) int64 group id per row; any values, a group's rows need not be adjacent
    exp_ptr,    # (R,) int8 1 on expert rows: excluded from the group statistics
    adv_ptr,    # (R,) fp32 out: A = (r - mu) [/ (std + eps)]; on expert rows A_E, the same formula
    R,          # rows
    STD: tl.constexpr, EPS: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    # One program = BLOCK_I rows i; three passes over all rows j (R is a few thousand at most) in a
    # fixed order, so the result is deterministic. mu = r_1 + sum(r_j - r_1) / n with r_1 the first
    # on-policy reward of the group: every difference is exactly 0 in a group of equal rewards.
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < R
    gi = tl.load(gid_ptr + i, mask=i_ok, other=-1)
    ri = tl.load(r_ptr + i, mask=i_ok, other=0.0)
    n = tl.zeros((BLOCK_I,), tl.int32)                 # on-policy rows in i's group
    first = tl.full((BLOCK_I,), 2147483647, tl.int32)  # index of its first on-policy row
    for j0 in range(0, R, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        same = _same_group(gi, gid_ptr, exp_ptr, j, R)
        n += tl.sum(same.to(tl.int32), axis=1)
        first = tl.minimum(first, tl.min(tl.where(same, j[None, :], 2147483647), axis=1))
    r1 = tl.load(r_ptr + first, mask=i_ok & (n > 0), other=0.0)
    dsum = tl.zeros((BLOCK_I,), tl.float32)
    for j0 in range(0, R, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        same = _same_group(gi, gid_ptr, exp_ptr, j, R)
        rj = tl.load(r_ptr + j, mask=j < R, other=0.0)
        dsum += tl.sum(tl.where(same, rj[None, :] - r1[:, None], 0.0), axis=1)
    mu = r1 + dsum / tl.maximum(n, 1).to(tl.float32)   # Eq. A: mean of the on-policy rewards
    adv = ri - mu                                   # a lone on-policy row: exactly 0 (decision 5)
    if STD:
        sq = tl.zeros((BLOCK_I,), tl.float32)
        for j0 in range(0, R, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            same = _same_group(gi, gid_ptr, exp_ptr, j, R)
            rj = tl.load(r_ptr + j, mask=j < R, other=0.0)
            dev = tl.where(same, rj[None, :] - mu[:, None], 0.0)
            sq += tl.sum(dev * dev, axis=1)
        std = tl.sqrt(sq / tl.maximum(n - 1, 1).to(tl.float32))     # unbiased, like torch.std
        adv = tl.where((n > 1) & (std > 0), adv / (std + EPS), adv)  # no spread: left unscaled
    tl.store(adv_ptr + i, adv, mask=i_ok)


# -----------------------------------------------------------------------------
# The head: logits tiles, split-vocab forward, merge + Eq. C, backward dL/dz

@triton.jit
def _logits_tile(h_ptr, w_ptr, hrows, cols, row_ok, col_ok, H, stride_h,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """z = hidden[hrows] @ W[cols]^T, (BLOCK_N, BLOCK_V) fp32; hrows, cols int64."""
    z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        h = tl.load(h_ptr + hrows[:, None] * stride_h + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)        # (BLOCK_N, BLOCK_H)
        w = tl.load(w_ptr + cols[None, :] * H + ks[:, None],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)        # (BLOCK_H, BLOCK_V)
        if UPCAST:  # the interpreter's bf16 dot is broken: compute it in fp32 there
            h, w = h.to(tl.float32), w.to(tl.float32)
        z = tl.dot(h, w, z, input_precision=PRECISION)                          # (BLOCK_N, BLOCK_V)
    return z


@triton.jit
def _head_fwd_kernel(
    h_ptr,      # hidden rows, (rows, H) with row stride stride_h, bf16 / fp16 / fp32
    hrow_ptr,   # (N,) int64 row of h_ptr holding token k's state (used if HAS_ROWS; else row k)
    w_ptr,      # (V, H) LM head, same dtype, row-major
    tgt_ptr,    # (N,) int64 target token ids
    sup_ptr,    # (V,) int8 1 = suppressed column (used if HAS_SUP)
    part_ptr,   # (4, S, N) fp32 out: per split the running max m, d = sum e^(s-m),
                #            a = sum e^(s-m) (s-m), and the target's s (0 outside its split)
    N, V, H, stride_h,
    VS,         # columns per split, a multiple of BLOCK_V
    INV_T: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_SUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Grid (S, token blocks), splits fastest: the S programs that run together share one hidden
    # block (read from HBM once, then from L2) and ~132 / S token blocks share each W tile.
    # Online update per tile: with m' = max(m, max s), d' = d e^(m-m') + sum e^(s-m') and
    # a' = e^(m-m') (a + d (m - m')) + sum e^(s-m') (s - m'); later lse = m + log d and
    # ent = log d - a/d (no difference of two large numbers).
    split = tl.program_id(0)
    toks = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_ok = toks < N
    hrows = tl.load(hrow_ptr + toks, mask=tok_ok, other=0) if HAS_ROWS else toks
    tgt = tl.load(tgt_ptr + toks, mask=tok_ok, other=-1).to(tl.int32)
    m = tl.full((BLOCK_N,), NEG, tl.float32)
    d = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    s_tgt = tl.zeros((BLOCK_N,), tl.float32)
    # the split's columns are addressed from its own base (w_split, sup_split): no loop-invariant
    # column vector for the compiler to hoist into registers
    v_lo = split * VS
    n_cols = tl.minimum(VS, V - v_lo)
    w_split = w_ptr + v_lo.to(tl.int64) * H
    sup_split = sup_ptr + v_lo
    tgt_rel = tgt - v_lo                                  # target column within the split
    for v0 in range(0, VS, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < n_cols
        live = col_ok
        if HAS_SUP:
            live = live & (tl.load(sup_split + cols, mask=col_ok, other=1) == 0)
        z = _logits_tile(h_ptr, w_split, hrows, cols.to(tl.int64), tok_ok, col_ok, H, stride_h,
                         BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
        s = tl.where(live[None, :], z * INV_T, NEG)                          # (BLOCK_N, BLOCK_V)
        s_tgt += tl.sum(tl.where(tgt_rel[:, None] == cols[None, :], s, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        scale = tl.exp(m - m_new)
        e = tl.where(live[None, :], tl.exp(s - m_new[:, None]), 0.0)       # 0: suppressed / padded
        a = scale * (a + d * (m - m_new)) + tl.sum(e * (s - m_new[:, None]), axis=1)
        d = scale * d + tl.sum(e, axis=1)
        m = m_new
    SN = tl.num_programs(0).to(tl.int64) * N                      # elements per partial (int64)
    out = part_ptr + split.to(tl.int64) * N + toks
    tl.store(out, m, mask=tok_ok)
    tl.store(out + SN, d, mask=tok_ok)
    tl.store(out + 2 * SN, a, mask=tok_ok)
    tl.store(out + 3 * SN, s_tgt, mask=tok_ok)


@triton.jit
def _loss_fwd_kernel(
    part_ptr,   # (4, S, N) fp32 partials of _head_fwd_kernel
    lse_ptr,    # (N,) fp32 out: log-sum-exp of s, saved for the backward
    logp_ptr,   # (N,) fp32 out: log pi(target) = s_target - lse
    ent_ptr,    # (N,) fp32 out: entropy of pi
    old_ptr,    # (N,) fp32 log pi_old(target)                        } used if LOSS
    base_ptr,   # (N,) fp32 expert baseline l^E_t (Eq. B)               }
    row_ptr,    # (N,) int64 row of each token                         }
    adv_ptr,    # (R,) fp32 A of each row (A_E on expert rows)          }
    pass_ptr,   # (R,) int8 1 = the row's answer is correct             }
    exp_ptr,    # (R,) int8 1 = expert row                              }
    dlogp_ptr,  # (N,) fp32 out: d(sum of per-token losses) / d log pi  }
    stat_ptr,   # (blocks, 10) fp32 out: per-block sums, columns = STATS }
    N, S,
    LOSS: tl.constexpr, ALGO: tl.constexpr,   # ALGO: 0 calibrl, 1 grpo, 2 luffy, 3 rlplus
    CLIP_LOW: tl.constexpr, CLIP_HIGH: tl.constexpr, CLIP_C: tl.constexpr,
    ALPHA: tl.constexpr, LAM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    toks = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = toks < N
    # merge the S splits in a fixed order: the same online update as across tiles
    m = tl.full((BLOCK_M,), NEG, tl.float32)
    d = tl.zeros((BLOCK_M,), tl.float32)
    a = tl.zeros((BLOCK_M,), tl.float32)
    s_tgt = tl.zeros((BLOCK_M,), tl.float32)
    SN = S.to(tl.int64) * N
    for k in range(0, S):
        src = part_ptr + k * N + toks                            # toks is int64: so is the sum
        mk = tl.load(src, mask=ok, other=0.0)
        dk = tl.load(src + SN, mask=ok, other=1.0)
        ak = tl.load(src + 2 * SN, mask=ok, other=0.0)
        s_tgt += tl.load(src + 3 * SN, mask=ok, other=0.0)
        m_new = tl.maximum(m, mk)
        c_old, c_k = tl.exp(m - m_new), tl.exp(mk - m_new)
        a = c_old * (a + d * (m - m_new)) + c_k * (ak + dk * (mk - m_new))
        d = c_old * d + c_k * dk
        m = m_new
    lse = m + tl.log(d)
    logp = s_tgt - lse
    tl.store(lse_ptr + toks, lse, mask=ok)
    tl.store(logp_ptr + toks, logp, mask=ok)
    tl.store(ent_ptr + toks, tl.log(d) - a / d, mask=ok)
    if LOSS:
        row = tl.load(row_ptr + toks, mask=ok, other=0)
        A = tl.load(adv_ptr + row, mask=ok, other=0.0)
        is_exp = ok & (tl.load(exp_ptr + row, mask=ok, other=0) != 0)
        on = ok & ~is_exp                                                  # on-policy tokens
        old = tl.load(old_ptr + toks, mask=ok, other=0.0)
        log_ratio = logp - old
        rho = tl.exp(log_ratio)
        # Eq. C, dual-clip PPO: max(-A rho, -A clip(rho)); for A < 0 also capped at -A c.
        # d/dlog pi: -A rho where the unclipped branch is the max (torch.maximum splits a tie in
        # half, and ties only occur inside the clip range, where both branches have slope -A rho);
        # 0 where the clipped branch wins or the cap binds (half at an exact tie with the cap).
        pg1 = -A * rho
        pg2 = -A * tl.minimum(tl.maximum(rho, 1.0 - CLIP_LOW), 1.0 + CLIP_HIGH)
        ppo0 = tl.maximum(pg1, pg2)
        cap = -A * CLIP_C
        d_ppo = tl.where(pg1 >= pg2, -A * rho, 0.0)
        capped = (A < 0) & (ppo0 > cap)
        d_ppo = tl.where(capped, 0.0, tl.where((A < 0) & (ppo0 == cap), 0.5 * d_ppo, d_ppo))
        ppo = tl.where(A < 0, tl.minimum(ppo0, cap), ppo0)
        tok = tl.where(on, ppo, 0.0)
        dtok = tl.where(on, d_ppo, 0.0)
        g = tl.zeros((BLOCK_M,), tl.float32)
        counted = on
        if ALGO == 0:
            # Eq. C, guided term: g = |A| LeakyReLU_alpha(-s (log pi - l^E)), s = +1 passed,
            # -1 failed; dg/dlog pi = |A| (1 if the argument is > 0 else alpha) (-s) (alpha at 0)
            sgn = tl.where(tl.load(pass_ptr + row, mask=ok, other=0) != 0, 1.0, -1.0)
            x = -sgn * (logp - tl.load(base_ptr + toks, mask=ok, other=0.0))
            g = tl.abs(A) * tl.where(x > 0, x, ALPHA * x)
            tok += tl.where(on, LAM * g, 0.0)
            dtok += tl.where(on, LAM * tl.abs(A) * tl.where(x > 0, 1.0, ALPHA) * -sgn, 0.0)
        if ALGO >= 2:
            counted = ok                                  # expert tokens count in the token-mean
            p = tl.exp(logp)                              # pi_theta(e_t)
            if ALGO == 2:
                # LUFFY: -A_E f(p), f(p) = p / (p + 0.1); d/dlog pi = -A_E 0.1 p / (p + 0.1)^2
                off = -A * p / (p + 0.1)
                d_off = -A * 0.1 * p / ((p + 0.1) * (p + 0.1))
            else:
                # RL-PLUS: -A_E w sg[(1 - p)^0.5], w = 2p / (pi_old + (pi_old + 1) / 2); linear
                # in p, so d/dlog pi = the term itself
                p_old = tl.exp(old)
                w = 2.0 * p / (p_old + 0.5 * (p_old + 1.0))
                off = -A * w * tl.sqrt(tl.maximum(1.0 - p, 0.0))
                d_off = off
            tok += tl.where(is_exp, off, 0.0)
            dtok += tl.where(is_exp, d_off, 0.0)
        tl.store(dlogp_ptr + toks, dtok, mask=ok)
        # per-block sums in the order of STATS (the host divides by the on-policy token count)
        onf = on.to(tl.float32)
        st = stat_ptr + pid * 10
        tl.store(st + 0, tl.sum(tok, axis=0))
        tl.store(st + 1, tl.sum(counted.to(tl.float32), axis=0))
        tl.store(st + 2, tl.sum(onf, axis=0))
        tl.store(st + 3, tl.sum(tl.where(on & (pg2 > pg1), 1.0, 0.0), axis=0))
        tl.store(st + 4, tl.sum(tl.where(on & capped, 1.0, 0.0), axis=0))
        tl.store(st + 5, tl.sum(tl.where(on, rho, 0.0), axis=0))
        tl.store(st + 6, tl.sum(tl.where(on, ppo, 0.0), axis=0))
        tl.store(st + 7, tl.sum(tl.where(on, g, 0.0), axis=0))
        tl.store(st + 8, tl.sum(tl.where(on, -log_ratio, 0.0), axis=0))
        tl.store(st + 9, tl.max(tl.where(on, tl.abs(rho - 1.0), 0.0), axis=0))


@triton.jit
def _dz_tile(pid_n, pid_v, h_ptr, w_ptr, tgt_ptr, lse_ptr, g_ptr, ent_ptr, gh_ptr, sup_ptr, dz_ptr,
             N, H, stride_h, v0, VC,
             INV_T: tl.constexpr, HAS_GH: tl.constexpr, HAS_SUP: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
             UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # With log p_j = s_j - lse and s = z / T:
    #   d logp / d s_j = onehot_j - p_j
    #   d ent  / d s_j = -p_j (log p_j + ent)          (= -p_j (s_j - E[s]))
    # so  dz_j = [ g (onehot_j - p_j) - g_ent p_j (log p_j + ent) ] / T,  and dz_j = 0 on suppressed
    # columns (their logit is -inf: p_j = 0 and no path from z_j to the loss).
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = v0 + pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < v0 + VC
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h,
                     BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
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
    if HAS_SUP:
        dz = tl.where(tl.load(sup_ptr + cols, mask=col_ok, other=1)[None, :] != 0, 0.0, dz)
    dz = dz * INV_T
    out = dz_ptr + rows[:, None] * VC + (cols - v0)[None, :]
    tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _head_bwd_kernel(
    h_ptr,      # (N, H) hidden states of the tokens with a gradient, row stride stride_h
    w_ptr,      # (V, H) LM head
    tgt_ptr,    # (N,) int64 target ids
    lse_ptr,    # (N,) fp32 saved log-sum-exp
    g_ptr,      # (N,) fp32 upstream dL/dlogp, pre-scaled by a power of two
    ent_ptr,    # (N,) fp32 saved entropy (used if HAS_GH)
    gh_ptr,     # (N,) fp32 upstream dL/dent, same scale (used if HAS_GH)
    sup_ptr,    # (V,) int8 1 = suppressed column (used if HAS_SUP)
    dz_ptr,     # (N, VC) out: dL/dz for vocab columns [v0, v0 + VC), row-major, dtype of hidden
    N, H, stride_h, v0, VC,
    INV_T: tl.constexpr, HAS_GH: tl.constexpr, HAS_SUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Grid (vocab tiles of the chunk, token blocks), vocab tiles fastest: consecutive programs reuse
    # one hidden block from L2, and the chunk's W (VC x H, 16 MB at VC = 4096) stays in L2.
    _dz_tile(tl.program_id(1), tl.program_id(0), h_ptr, w_ptr, tgt_ptr, lse_ptr, g_ptr, ent_ptr,
             gh_ptr, sup_ptr, dz_ptr, N, H, stride_h, v0, VC, INV_T, HAS_GH, HAS_SUP,
             BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)


# -----------------------------------------------------------------------------
# Host launchers

def _config(dtype):
    """One fixed configuration per target (kernels/sweep.py explores others, off the reading path).
    GPU (H100 / H200, compiled for sm_90a): 128 x 128 x 64 bf16 tiles, 8 warps, 3 stages use 96 KB
    of shared memory and 185 registers without spills (fp32: 64-token blocks, 196 registers); S = 8
    vocab splits fill 132 SMs from ~2k tokens (N / 128 x 8 programs) while ~16 token blocks still
    share each W tile. The interpreter's cost is per operation: few, large blocks, and S = 2 so that
    the tests exercise the merge."""
    precision = "ieee" if dtype == torch.float32 else "tf32"   # "tf32" is ignored for 16-bit inputs
    if INTERPRET:
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, UPCAST=dtype == torch.bfloat16,
                    PRECISION=precision, SPLITS=2, BLOCK_M=128, BLOCK_R=8)
    fp32 = dtype == torch.float32
    return dict(BLOCK_N=64 if fp32 else 128, BLOCK_V=128, BLOCK_H=32 if fp32 else 64, UPCAST=False,
                PRECISION=precision, num_warps=8, num_stages=3, SPLITS=8, BLOCK_M=512, BLOCK_R=64)


def _tile_cfg(cfg):
    keys = ("BLOCK_N", "BLOCK_V", "BLOCK_H", "UPCAST", "PRECISION", "num_warps", "num_stages")
    return {k: cfg[k] for k in keys if k in cfg}


def _check_inputs(hidden, weight):
    assert hidden.dtype == weight.dtype, f"hidden {hidden.dtype} and weight {weight.dtype} differ"
    assert hidden.shape[-1] == weight.shape[1], "hidden (..., H) and weight (V, H)"
    if not (hidden.is_cuda and weight.is_cuda) and not INTERPRET:
        raise RuntimeError("CPU tensors need TRITON_INTERPRET=1 set before triton is imported")


def fused_group_advantages(rewards, group_ids, expert_rows=None, std_normalize=False, eps=1e-6):
    """Eq. A in Triton. rewards (R,), group_ids (R,) any integers, expert_rows (R,) bool or None ->
    advantages (R,) fp32 (A on on-policy rows, A_E on expert rows), passed (R,) bool (r > 0.5:
    accuracy 1; never r > 0.1, see the spec)."""
    R = rewards.shape[0]
    r = rewards.detach().float().contiguous()
    gid = group_ids.to(device=r.device, dtype=torch.int64).contiguous()
    ex = torch.zeros(R, dtype=torch.int8, device=r.device) if expert_rows is None else \
        expert_rows.to(device=r.device, dtype=torch.int8).contiguous()
    adv = torch.empty(R, device=r.device, dtype=torch.float32)
    if R:
        blk = _config(torch.float32)["BLOCK_R"]
        _advantages_fwd_kernel[(triton.cdiv(R, blk),)](r, gid, ex, adv, R, STD=bool(std_normalize),
                                                       EPS=float(eps), BLOCK_I=blk, BLOCK_J=blk)
    return adv, rewards > 0.5


def _suppress_mask(suppress_ids, V, device):
    """(V,) int8, 1 on the suppressed columns; None when nothing is suppressed."""
    if suppress_ids is None or len(suppress_ids) == 0:
        return None
    sup = torch.zeros(V, dtype=torch.int8, device=device)
    sup[torch.as_tensor(suppress_ids, dtype=torch.int64, device=device)] = 1
    return sup


# hidden is read where it lies. (N, H) with unit stride on H is read as is; (R, T, H) with strides
# (k s, s, 1), e.g. h[:, L-1:-1] of a (R, L + T, H) tensor, is read as rows of stride s over its
# storage, position (r, t) in row r * k + t. Anything else is copied once (_readable).

def _readable(hidden):
    ok = hidden.stride(-1) == 1
    if hidden.dim() == 3 and hidden.numel():
        s0, s1, _ = hidden.stride()
        ok = ok and s1 > 0 and s0 % s1 == 0
    return hidden if ok else hidden.contiguous()


def _rows_view(hidden):
    """-> (h2, k): the 2-D view of hidden's storage that the kernels read, and k (None for 2-D)."""
    if hidden.dim() == 2:
        return hidden, None
    R, T, H = hidden.shape
    k = hidden.stride(0) // hidden.stride(1) if hidden.numel() else T
    if k == T:
        return hidden.reshape(R * T, H), k
    return hidden.as_strided(((R - 1) * k + T, H), (hidden.stride(1), 1)), k


def _token_rows(hidden, pos):
    """Row of _rows_view(hidden) for each token at flat position pos = r * T + t (None: all
    positions) -> (N,) int64, or None when token k is row k."""
    k = _rows_view(hidden)[1]
    T = hidden.shape[1] if hidden.dim() == 3 else None
    if k == T:
        return pos
    if pos is None:
        pos = torch.arange(hidden.shape[0] * T, device=hidden.device)
    return pos // T * k + pos % T


def _head_fwd(hidden, hrow, weight, targets, inv_t, sup, loss=None):
    """Forward of the head for N tokens, read at rows hrow of _rows_view(hidden) (None: row k).
    loss: None, or the per-token / per-row inputs of Eq. C and its constants.
    -> lse, logp, ent, dlogp (N,) fp32 and stats (10,) in the order of STATS."""
    h2, _ = _rows_view(hidden)
    N, H, V = targets.shape[0], h2.shape[1], weight.shape[0]
    dev = h2.device
    lse, logp, ent, dlogp = (torch.empty(N, device=dev, dtype=torch.float32) for _ in range(4))
    cfg = _config(h2.dtype)
    blocks = triton.cdiv(N, cfg["BLOCK_M"])
    stats = torch.zeros(max(blocks, 1), len(STATS), device=dev, dtype=torch.float32)
    if N:   # an all-padding micro-batch has no token to score
        bv = cfg["BLOCK_V"]
        vs = triton.cdiv(triton.cdiv(V, cfg["SPLITS"]), bv) * bv     # columns per split
        S = triton.cdiv(V, vs)
        part = torch.empty(4, S, N, device=dev, dtype=torch.float32)
        _head_fwd_kernel[(S, triton.cdiv(N, cfg["BLOCK_N"]))](
            h2, targets if hrow is None else hrow, weight, targets, targets if sup is None else sup,
            part, N, V, H, h2.stride(0), vs, INV_T=inv_t, HAS_ROWS=hrow is not None,
            HAS_SUP=sup is not None, **_tile_cfg(cfg))
        L = loss or dict(old=lse, base=lse, row=targets, adv=lse, passed=targets, expert=targets,
                         algo=0, clip_low=0.0, clip_high=0.0, clip_c=0.0, alpha=0.0, lam=0.0)
        _loss_fwd_kernel[(blocks,)](
            part, lse, logp, ent, L["old"], L["base"], L["row"], L["adv"], L["passed"], L["expert"],
            dlogp, stats, N, S, LOSS=loss is not None, ALGO=L["algo"], CLIP_LOW=L["clip_low"],
            CLIP_HIGH=L["clip_high"], CLIP_C=L["clip_c"], ALPHA=L["alpha"], LAM=L["lam"],
            BLOCK_M=cfg["BLOCK_M"])
    st = torch.cat([stats[:, :9].sum(0), stats[:, 9].max(0, keepdim=True).values])   # fixed order
    return lse, logp, ent, dlogp, st


def _mm_fp32(a, b):
    """a @ b accumulated and returned in fp32: on CUDA a 16-bit cuBLAS GEMM with fp32 output."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()   # CPU: tests only


_ADDMM_INTO_FP32 = True   # torch.addmm(fp32 C, 16-bit A, B, out_dtype=fp32): newer torch only


def _addmm_fp32_(acc, a, b):
    """acc (fp32) += a @ b with fp32 accumulation: in place where torch takes an fp32 input to a
    16-bit addmm, else in row slices through a small fp32 temporary (never a full (n, H) one)."""
    global _ADDMM_INTO_FP32
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _ADDMM_INTO_FP32:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):   # older torch: the input must share the 16-bit dtype
            _ADDMM_INTO_FP32 = False
    step = max(1, DH_SLICE_ELEMS // acc.shape[1])
    for r0 in range(0, a.shape[0], step):
        acc[r0:r0 + step] += _mm_fp32(a[r0:r0 + step], b)


def _head_bwd(hidden, hrow, dpos, weight, targets, lse, g, ent, gh, inv_t, sup, need_dh, need_dw):
    """dH (shaped like hidden, zero where no token was scored) and dW from the upstream gradients
    g of log pi and gh of the entropy, (N,) each; gh may be None. dpos (N,): the row of the
    flattened dH that token k's gradient goes to (None: row k)."""
    h2, _ = _rows_view(hidden)
    N, H, V = targets.shape[0], h2.shape[1], weight.shape[0]
    live = (g != 0) if gh is None else (g != 0) | (gh != 0)    # (N,) tokens that carry a gradient
    idx = live.nonzero().squeeze(1)                  # one host sync; skips A = 0 and expert rows
    n = idx.numel()
    if n == N and hrow is None:
        h = h2                                                  # every token live: hidden, no copy
    else:
        h = h2[idx if hrow is None else hrow[idx]]              # (n, H) live rows, for the GEMMs
        targets, lse, g = targets[idx], lse[idx], g[idx]
        ent, gh = (None, None) if gh is None else (ent[idx], gh[idx])
    # scale the upstream gradients to max 1 by a power of two (exact): fp16 dz stays normal
    gmax = g.abs().max() if n else g.new_ones(())
    if gh is not None and n:
        gmax = torch.maximum(gmax, gh.abs().max())
    scale = torch.exp2(torch.ceil(torch.log2(gmax.clamp(min=1e-30))))
    g = (g / scale).contiguous()
    gh = None if gh is None else (gh / scale).contiguous()
    acc = torch.zeros(n, H, device=h.device, dtype=torch.float32) if need_dh else None   # fp32 dH
    dw = (torch.empty_like(weight) if n else torch.zeros_like(weight)) if need_dw else None
    cfg = _config(h.dtype)
    bv = cfg["BLOCK_V"]
    vc = max(bv, CHUNK_ELEMS // max(n, 1) // bv * bv)
    buf = torch.empty(n * min(vc, V), device=h.device, dtype=h.dtype)
    for v0 in range(0, V if n else 0, vc):
        c = min(vc, V - v0)
        dz = buf[: n * c].view(n, c)                                  # (n, c) one chunk of dL/dz
        grid = (triton.cdiv(c, bv), triton.cdiv(n, cfg["BLOCK_N"]))         # vocab tiles fastest
        _head_bwd_kernel[grid](h, weight, targets, lse, g, lse if ent is None else ent,
                               g if gh is None else gh, targets if sup is None else sup, dz,
                               n, H, h.stride(0), v0, c, INV_T=inv_t, HAS_GH=gh is not None,
                               HAS_SUP=sup is not None, **_tile_cfg(cfg))
        if need_dw:   # one GEMM over all tokens (fp32, no 16-bit split-K), rescaled into W's dtype
            torch.mul(_mm_fp32(dz.T, h), scale, out=dw[v0:v0 + c])
        if need_dh:   # accumulated across chunks in fp32
            _addmm_fp32_(acc, dz, weight[v0:v0 + c])
    del buf
    if not need_dh:
        return None, dw
    acc.mul_(scale)
    shape, M = hidden.shape, hidden.shape[:-1].numel()     # dH is returned shaped like hidden
    if n == N == M and dpos is None:                         # every row scored and live: no scatter
        return (acc if acc.dtype == hidden.dtype else acc.to(hidden.dtype)).view(shape), dw
    dh = torch.zeros(M, H, device=h.device, dtype=hidden.dtype)
    pos = idx if dpos is None else dpos[idx]
    step = max(1, DH_SLICE_ELEMS // H)
    for r0 in range(0, n, step):   # in row slices: no second full-size temporary
        dh.index_copy_(0, pos[r0:r0 + step], acc[r0:r0 + step].to(hidden.dtype))
    return dh.view(shape), dw


# -----------------------------------------------------------------------------
# autograd

class FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, hrow, temperature, sup):
        inv_t = 1.0 / float(temperature)   # a constexpr: fp32 in the kernel, also under compile
        lse, logp, ent, _, _ = _head_fwd(hidden, hrow, weight, targets, inv_t, sup)
        ctx.save_for_backward(hidden, weight, targets, hrow, lse, ent, sup)
        ctx.inv_t = inv_t
        ctx.set_materialize_grads(False)   # an unused entropy gets g_ent = None: term skipped
        return logp, ent

    @staticmethod
    def backward(ctx, g, g_ent):
        hidden, weight, targets, hrow, lse, ent, sup = ctx.saved_tensors
        g = torch.zeros_like(lse) if g is None else g.float()
        gh = None if g_ent is None else g_ent.float()
        dh, dw = _head_bwd(hidden, hrow, None, weight, targets, lse, g, ent, gh, ctx.inv_t, sup,
                           ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dh, dw, None, None, None, None


class FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, hrow, dpos, loss_in, num_tokens, temperature, sup):
        inv_t = 1.0 / float(temperature)
        lse, _, _, dlogp, st = _head_fwd(hidden, hrow, weight, targets, inv_t, sup, loss_in)
        denom = st[1].clamp(min=1) if num_tokens is None else \
            torch.as_tensor(num_tokens, dtype=torch.float32, device=st.device)
        # saved: lse and dL/dlog pi per token (fp32); the logits are recomputed in the backward
        ctx.save_for_backward(hidden, weight, targets, hrow, dpos, lse, dlogp, denom, sup)
        ctx.inv_t = inv_t
        ctx.mark_non_differentiable(st)
        return st[0] / denom, st

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        # the loss is elementwise in log pi: dL/dlog pi came from the forward; only the head remains
        hidden, weight, targets, hrow, dpos, lse, dlogp, denom, sup = ctx.saved_tensors
        g = dlogp * (grad_loss.float() / denom)
        dh, dw = _head_bwd(hidden, hrow, dpos, weight, targets, lse, g, None, None, ctx.inv_t, sup,
                           ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dh, dw, None, None, None, None, None, None, None


# -----------------------------------------------------------------------------
# Public entry points

def fused_logprobs(hidden, weight, targets, temperature=1.0, *, suppress_ids=None):
    """hidden (N, H) or (R, T, H), weight (V, H) same dtype, targets (N,) / (R, T) -> fp32
    log pi(target) and entropy shaped like targets, both differentiable w.r.t. hidden and weight."""
    _check_inputs(hidden, weight)
    hidden = _readable(hidden)
    sup = _suppress_mask(suppress_ids, weight.shape[0], hidden.device)
    tgt = targets.reshape(-1).long().contiguous()
    logp, ent = FusedLogprobs.apply(hidden, weight.contiguous(), tgt, _token_rows(hidden, None),
                                    temperature, sup)
    return logp.view(targets.shape), ent.view(targets.shape)


def fused_policy_loss_tokens(hidden, weight, targets, old_logp, row_ids, expert_logp=None,
                             rewards=None, group_ids=None, *, advantages=None, passed=None,
                             expert_rows=None, algo="calibrl", temperature=1.0,
                             std_normalize=False, clip_low=0.2, clip_high=0.2, clip_c=3.0,
                             alpha=0.5, lam=0.1, num_tokens=None, suppress_ids=None,
                             _rows=(None, None)):
    """Packed tokens: hidden (N, H), weight (V, H); targets / old_logp / row_ids / expert_logp (N,),
    valid tokens only; rewards / group_ids / advantages / passed / expert_rows (R,). Give rewards +
    group_ids (Eq. A in Triton) or advantages + passed. Returns (loss, metrics) as
    calibrl.policy_loss; the loss is differentiable w.r.t. hidden and weight.
    (_rows, internal: fused_policy_loss hands hidden (R, T, H) over with each token's row of
    _rows_view(hidden) and of the flattened dH.)"""
    _check_inputs(hidden, weight)
    if algo not in ALGOS:
        raise ValueError(f"unknown algo {algo!r}")
    if hidden.dim() != 2 and _rows[0] is None:
        raise ValueError(f"hidden must be (N, H) here, got {tuple(hidden.shape)}")
    hidden = _readable(hidden)
    dev, N = hidden.device, targets.numel()
    if advantages is None:   # Eq. A in Triton
        advantages, passed_r = fused_group_advantages(rewards, group_ids, expert_rows,
                                                      std_normalize)
        passed = passed_r if passed is None else passed
    if passed is None:
        if rewards is None and algo == "calibrl":
            raise ValueError("calibrl needs passed (or rewards) with advantages")
        passed = rewards > 0.5 if rewards is not None else torch.zeros_like(advantages).bool()
    R = advantages.shape[0]
    expert_logp = torch.zeros(N, device=dev) if expert_logp is None else expert_logp
    expert_rows = torch.zeros(R, device=dev) if expert_rows is None else expert_rows
    f32 = lambda x: x.detach().reshape(-1).to(device=dev, dtype=torch.float32).contiguous()  # noqa
    i8 = lambda x: x.to(device=dev, dtype=torch.int8).contiguous()                          # noqa
    loss_in = dict(old=f32(old_logp), base=f32(expert_logp), adv=f32(advantages), passed=i8(passed),
                   row=row_ids.reshape(-1).to(device=dev, dtype=torch.int64).contiguous(),
                   expert=i8(expert_rows), algo=ALGOS[algo], clip_low=float(clip_low),
                   clip_high=float(clip_high), clip_c=float(clip_c), alpha=float(alpha),
                   lam=float(lam))
    sup = _suppress_mask(suppress_ids, weight.shape[0], dev)
    tgt = targets.reshape(-1).long().contiguous()
    loss, st = FusedPolicyLoss.apply(hidden, weight.contiguous(), tgt, *_rows, loss_in, num_tokens,
                                     temperature, sup)
    n = st[2].clamp(min=1)   # on-policy tokens, as in calibrl.policy_loss
    metrics = {"loss/clipfrac": st[3] / n, "loss/dualclip_frac": st[4] / n, "loss/ratio": st[5] / n,
               "loss/ratio_max_dev": st[9], "loss/ppo": st[6] / n, "loss/guided": st[7] / n,
               "loss/approx_kl": st[8] / n, "tokens": st[1]}
    return loss, metrics


def fused_policy_loss(hidden, weight, targets, old_logp, mask, rewards=None, group_ids=None, *,
                      advantages=None, passed=None, algo="calibrl", expert_logp=None,
                      expert_rows=None,
                      temperature=1.0, std_normalize=False, clip_low=0.2, clip_high=0.2, clip_c=3.0,
                      alpha=0.5, lam=0.1, num_tokens=None, suppress_ids=None):
    """hidden (R, T, H), weight (V, H); targets / old_logp / mask / expert_logp (R, T);
    rewards / group_ids / expert_rows / advantages / passed (R,). Give rewards + group_ids (Eq. A
    inside) or advantages + passed. Returns (loss, metrics) equal to calibrl.policy_loss on
    token_logprobs(hidden @ weight.T, targets, temperature)[0]; differentiable w.r.t. hidden and
    weight. The valid tokens (mask > 0) go to fused_policy_loss_tokens by index: hidden is not
    copied."""
    R, T, H = hidden.shape
    hidden = _readable(hidden)
    pos = (mask.reshape(-1) > 0).nonzero().squeeze(1)    # (N,) valid positions r * T + t; host sync
    every = pos.numel() == R * T
    tok = lambda x: None if x is None else (x.reshape(-1) if every else x.reshape(-1)[pos])  # noqa
    rows = (_token_rows(hidden, None if every else pos), None if every else pos)
    if rows[0] is None and rows[1] is None:   # every position valid, rows contiguous: (N, H) view
        hidden = hidden.view(R * T, H)
    return fused_policy_loss_tokens(
        hidden, weight, tok(targets), tok(old_logp), pos // max(T, 1), tok(expert_logp), rewards,
        group_ids, advantages=advantages, passed=passed, expert_rows=expert_rows, algo=algo,
        temperature=temperature, std_normalize=std_normalize, clip_low=clip_low,
        clip_high=clip_high, clip_c=clip_c, alpha=alpha, lam=lam, num_tokens=num_tokens,
        suppress_ids=suppress_ids, _rows=rows)
