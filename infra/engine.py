"""
infra/engine.py -- the rollout engine: calibrl.generate's G samples per prompt without
transformers' `generate`, at the paper's scale.
 1. Memory by budget: plan_calls puts a rank's prompts, longest first, into calls whose KV cache
    fits --rollout-max-tokens positions (call_tokens); too_long reports, at data validation, a
    prompt that cannot fit a call on its own.
 2. Prefill once per prompt: a prompt (its images included) runs through the model once; its G
    samples share that prompt's KV cache instead of holding G copies of it.
 3. No waste in decoding: one KV arena per rollout, preallocated (no cache that grows by
    concatenation); prompts whose samples all ended leave the batch and rows shrink to their
    live samples; on CUDA the decode step can be a CUDA graph (cuda_graph, off by default: no
    GPU measurement yet).
 4. Exact sampling: calibrl.sampling_config's distribution, softmax(logits / T) over every id but
    the suppressed ones (top-p only if asked), drawn from the global torch RNG of the rollout
    device, so a checkpoint's RNG state resumes exactly; each token comes with its log-prob under
    the sampler (rollout/logprob_gap).

How a call decodes -- the G samples of a prompt share one batch row of the cache:
  cache row b: [ prompt b (n_b tokens) | pad to P | step-0 keys of its q slots | step 1 | ... ]
At each step a row feeds the last token of each of its q <= G live samples as q query positions;
their keys and values become q new columns, and a mask lets each sample see the prompt's columns
and its own earlier columns only. The prompt is stored and read once per row, not G times (with
1,000-token prompts, G = 10 and 512 new tokens: 2.5x less KV to hold and to read). The mask is
an explicit tensor, so attention runs through rollout_attention (registered with transformers,
switched on only inside generate), which also folds the query heads sharing a KV head into the
query axis: grouped-query models never copy K and V per head.

Budget accounting (call_tokens): a call of B prompts padded to P tokens, n samples of at most T
tokens, allocates B * S KV positions per layer, S = P + n * T rounded up to a multiple of ALIGN
(the prompt once, n * T sample positions). A position costs 2 * layers * kv_heads * head_dim *
bytes: 36 KiB for Qwen2.5-VL-3B in bf16. A prefill forward takes at most prefill_tokens prompt
tokens (at least one prompt), so prefill activations stay bounded too.

FSDP2: generate needs whole weights (inside gathered(policy), through policy's forward); then no
forward runs a collective, so ranks run their own numbers of calls and decode steps (no
synced_gpus). The only collective is the optional all_sum, once per call, for global progress:
then every rank runs n_calls calls, those past its own plan being dummies without a forward.

Shapes: B prompts in a call, G samples per prompt (= n), q live sample slots per row (q <= G),
P padded prompt length, T response budget, S cache columns per row, K columns attended at a step,
H query heads, kvh KV heads, rep = H // kvh, hd head dim, A rotary axes (3: M-RoPE), V vocab.
"""
import contextlib
import os
import time

import torch

from infra import distributed, family, sampling

ALIGN = 16  # cache columns per row are a multiple of this: aligned mask and KV rows for SDPA


def call_tokens(P, n, max_new_tokens, B=1):
    """KV positions (per layer) that a call of B prompts padded to P tokens allocates."""
    return B * (-(-(P + n * max_new_tokens) // ALIGN) * ALIGN)


def max_prompt_length(n, max_new_tokens, max_tokens):
    """The longest prompt that fits the budget on its own (0 if none does)."""
    return max(0, (max_tokens // ALIGN) * ALIGN - n * max_new_tokens)


def too_long(lengths, n, max_new_tokens, max_tokens):
    """-> [(index, positions needed)] of each prompt that cannot fit a call on its own."""
    return [(i, call_tokens(L, n, max_new_tokens)) for i, L in enumerate(lengths)
            if call_tokens(L, n, max_new_tokens) > max_tokens]


class Call:
    """One generate call: prompts (rank-local indices, ascending), P the longest prompt, tokens
    the KV positions it allocates (call_tokens: what the budget counts)."""
    def __init__(self, prompts, P, tokens):
        self.prompts, self.P, self.tokens = prompts, P, tokens

    def __repr__(self):
        return f"Call(prompts={self.prompts}, P={self.P}, tokens={self.tokens})"


def plan_calls(lengths, n, max_new_tokens, max_tokens):
    """lengths: prompt tokens (images included) of each of this rank's prompts -> [Call].
    Prompts are taken longest first, so a call holds prompts of similar length (little padding)
    and its first prompt sets P; a call grows while call_tokens <= max_tokens. Every prompt is in
    exactly one call. The rows a call samples are bounded too: B * n <= max_tokens / T."""
    bad = too_long(lengths, n, max_new_tokens, max_tokens)
    if bad:
        i, need = bad[0]
        raise ValueError(f"prompt {i} ({lengths[i]} tokens) needs {need} KV positions with {n} "
                         f"samples of {max_new_tokens} tokens > max_tokens {max_tokens}")
    calls, cur = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if cur and call_tokens(lengths[cur[0]], n, max_new_tokens, len(cur) + 1) > max_tokens:
            calls.append(cur)
            cur = []
        cur.append(i)
    calls += [cur] if cur else []
    return [Call(sorted(c), lengths[c[0]], call_tokens(lengths[c[0]], n, max_new_tokens, len(c)))
            for c in calls]


class StaticKV:
    """The KV arena: per layer one K and one V buffer of `tokens` positions, allocated at the
    layer's first write (dtype and device of its keys) and reused by every call of the rollout; a
    call views them as (B, kvh, S, hd). transformers' attention layers call update(k, v, layer).
    Modes: ("prefill", r0, r1): rows r0:r1, columns 0:P, returns the fresh keys;
    ("decode", c, q, K): q new columns at c, returns columns 0:K (K >= c+q, a multiple of ALIGN:
    the columns past c+q are masked); ("static", cols): columns at the device tensor cols,
    returns all S columns (fixed shapes, for a CUDA graph)."""
    def __init__(self, tokens):
        self.tokens, self.flat, self.views = tokens, {}, {}
        self.B = self.S = None
        self.mode, self.length = None, 0  # length: columns the last forward wrote up to

    def start_call(self, B, S):
        assert B * S <= self.tokens
        self.B, self.S, self.views = B, S, {}

    def layer(self, i, like=None):
        """-> [K, V] views (B, kvh, S, hd) of layer i (like: its first keys, to allocate)."""
        if i not in self.views:
            if i not in self.flat:
                _, kvh, _, hd = like.shape
                # zeros, not empty: a static step reads columns not yet written; they are masked,
                # but a NaN bit pattern there would still make 0 * NaN = NaN
                self.flat[i] = (kvh, hd, [torch.zeros(self.tokens * kvh * hd, dtype=like.dtype,
                                                      device=like.device) for _ in range(2)])
            kvh, hd, bufs = self.flat[i]
            n = self.B * kvh * self.S * hd
            self.views[i] = [f[:n].view(self.B, kvh, self.S, hd) for f in bufs]
        return self.views[i]

    def update(self, key, value, layer_idx, *args, **kwargs):
        """key, value (b, kvh, q, hd): the forward's new positions -> the K, V attention reads."""
        k, v = self.layer(layer_idx, key)
        if self.mode[0] == "prefill":
            _, r0, r1 = self.mode
            k[r0:r1, :, :key.shape[2]] = key
            v[r0:r1, :, :key.shape[2]] = value
            self.length = key.shape[2]
            return key, value                           # causal attention over the prompts alone
        if self.mode[0] == "decode":
            _, c, q, K = self.mode
            k[:, :, c:c + q] = key
            v[:, :, c:c + q] = value
            self.length = c + q
            return k[:, :, :K], v[:, :, :K]             # (B, kvh, K, hd)
        cols = self.mode[1]                             # static: (q,) long on the device
        k.index_copy_(2, cols, key)
        v.index_copy_(2, cols, value)
        self.length = self.S
        return k, v

    def get_seq_length(self, layer_idx=0):
        """transformers' Cache API (unused: positions and masks are always passed in)."""
        return self.length

    def keep_rows(self, keep):
        """Compact the batch to rows `keep` (ascending ints) in place, without a second copy of
        the cache: row i takes row keep[i] >= i, which no earlier move has overwritten."""
        for i in list(self.views):
            for buf in self.views[i]:
                for dst, src in enumerate(keep):
                    if dst != src:
                        buf[dst].copy_(buf[src])
        self.start_call(len(keep), self.S)


ROLLOUT_ATTENTION = "calibrl_rollout"


def rollout_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      **kwargs):
    """transformers AttentionInterface entry, used inside generate only.
    query (b, H, q, hd); key, value (b, kvh, K, hd) as StaticKV.update returned them.
    attention_mask None: a prefill (right-padded prompts, fresh keys, K == q): causal.
    attention_mask (b, 1, rep*q, K) float: a decode step, with the heads folded as below."""
    F = torch.nn.functional
    b, H, q, hd = query.shape
    kvh = key.shape[1]
    rep = H // kvh
    if attention_mask is None:
        if rep > 1:  # query head h reads KV head h // rep (repeat_kv); a prefill is compute-bound,
            key = key.repeat_interleave(rep, 1)        # so this copy costs little, and plain SDPA
            value = value.repeat_interleave(rep, 1)    # may take its flash kernel
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    else:
        # Fold the rep query heads of each KV head into the query axis: row r*q + j of KV head g
        # is query head g*rep + r at slot j. Each KV head is read once for all of them.
        out = F.scaled_dot_product_attention(query.reshape(b, kvh, rep * q, hd), key, value,
                                             attn_mask=attention_mask, scale=scaling)
        out = out.view(b, H, q, hd)
    return out.transpose(1, 2).contiguous(), None                                # (b, q, H, hd)


def decoder_attention(model):
    """The decoder's self-attention modules (they carry a layer_idx; vision attention has none)."""
    found = [m for m in model.modules() if getattr(m, "layer_idx", None) is not None
             and hasattr(m, "num_key_value_groups") and hasattr(m, "config")]
    if not found:
        raise TypeError(f"{type(model).__name__}: no decoder attention layers with a layer_idx")
    return found


@contextlib.contextmanager
def rollout_attention_on(model):
    """The decoder's attention layers call rollout_attention (the vision tower keeps its own);
    each config's implementation is restored on exit, exceptions included."""
    from transformers import AttentionInterface
    AttentionInterface.register(ROLLOUT_ATTENTION, rollout_attention)
    configs = list({id(m.config): m.config for m in decoder_attention(model)}.values())
    saved = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = ROLLOUT_ATTENTION
    try:
        yield
    finally:
        for c, s in zip(configs, saved):
            c._attn_implementation = s


class RolloutModel:
    """What generate needs of a transformers causal LM / VLM, found once: the base model (vision
    tower + decoder, returns hidden states), the LM head, its family block (positions, images),
    the cache keyword, the mask keys."""
    def __init__(self, model):
        import inspect
        self.model, self.base, self.head = model, model.base_model, model.get_output_embeddings()
        self.family = family.of(model)
        params = inspect.signature(self.base.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in 5.2x
        text = model.config.get_text_config()
        self.layer_types = sorted(set(getattr(text, "layer_types", None) or ["full_attention"]))
        if "sliding_attention" in self.layer_types:
            raise NotImplementedError("rollout engine: sliding-window attention layers")
        self.rep = decoder_attention(model)[0].num_key_value_groups
        self.A = self.family.axes
        self.device = model.get_input_embeddings().weight.device

    def hidden(self, ids, pos, mask, kv, **images):
        """ids (b, q), pos (A, b, q), mask None | (b, 1, rep*q, K) -> last hidden (b, q, H)."""
        out = self.base(input_ids=ids, position_ids=self.family.position_ids(pos), use_cache=True,
                        attention_mask={t: mask for t in self.layer_types},  # a dict: used as is
                        **{self.cache_kw: kv}, **images)
        return out.last_hidden_state


def prefill(m, encs, call, kv, pad_id, prefill_tokens):
    """Run each prompt of the call through the model once (its images encoded once), writing its
    keys and values into cache row b, columns [0, n_b). -> logits (B, V) at each prompt's last
    token, n_tok (B,) prompt lengths, delta (B,) rope deltas, the compute dtype.
    Prompts are right-padded to P, at most prefill_tokens per forward: with the padding at the
    end, plain causal attention is exact for the real tokens (they never see a pad), so no mask is
    built and SDPA may use its flash kernel. Decoding never sees the pads' columns."""
    dev, B, P = m.device, len(call.prompts), call.P
    pe = [m.family.positions(encs[i]) for i in call.prompts]
    n_tok = torch.tensor([encs[i]["input_ids"].shape[1] for i in call.prompts])   # (B,)
    delta = torch.tensor([d for _, d in pe])                                      # (B,)
    per, logits = max(1, prefill_tokens // P), []
    for r0 in range(0, B, per):
        rows = list(range(r0, min(B, r0 + per)))
        ids = torch.full((len(rows), P), pad_id, dtype=torch.long)               # (b, P)
        pos = torch.zeros(m.A, len(rows), P, dtype=torch.long)                    # (A, b, P)
        for j, r in enumerate(rows):
            n = int(n_tok[r])
            ids[j, :n] = encs[call.prompts[r]]["input_ids"][0]
            pos[:, j, :n] = pe[r][0]
            pos[:, j, n:] = torch.arange(n, P) + delta[r]                         # pads: unseen
        images = m.family.image_inputs([encs[call.prompts[r]] for r in rows])  # in row order
        images = {k: v.to(dev) for k, v in images.items()}
        kv.mode = ("prefill", r0, r0 + len(rows))
        h = m.hidden(ids.to(dev), pos.to(dev), None, kv, **images)               # (b, P, H)
        last = (n_tok[rows] - 1).to(dev)                                          # (b,)
        logits.append(m.head(h[torch.arange(len(rows), device=dev), last]))      # (b, V)
        dtype = h.dtype
        del h
    return torch.cat(logits), n_tok, delta, dtype


def _bias(seen, rep, dtype):
    """seen (b, q, K) bool, column visible to slot -> additive mask (b, 1, rep*q, K), contiguous,
    rows folded as in rollout_attention. K is a multiple of ALIGN: CUDA's memory-efficient SDPA
    then reads the mask as it is (otherwise it pads a copy expanded over the heads, every layer)."""
    b, q, K = seen.shape
    bias = torch.zeros(b, rep, q, K, dtype=dtype, device=seen.device)
    bias.masked_fill_(~seen[:, None], float("-inf"))
    return bias.view(b, 1, rep * q, K)


class _Meter:
    """A rollout's progress for the `progress` callback: at most one report every `every`
    seconds, the first after `every` seconds, so a short rollout reports nothing. Tokens are
    counted on the device (no sync per step); a report reads them (one sync)."""
    def __init__(self, progress, every, prompts_total, device):
        self.progress, self.every, self.total = progress, every, prompts_total
        self.t0 = self.last = time.time()
        self.prompts = 0                                   # prompts of the calls finished
        self.tokens = torch.zeros((), dtype=torch.long, device=device)

    def tick(self, prompts_in_call=0):
        now = time.time()
        if self.progress is None or now - self.last < self.every:
            return
        self.last, tokens, dt = now, int(self.tokens), now - self.t0
        self.progress(dict(prompts=self.prompts + prompts_in_call, prompts_total=self.total,
                           tokens=tokens, seconds=dt, tokens_per_sec=tokens / max(dt, 1e-9)))


def show_progress(p):
    """The default progress line of a long rollout, on rank 0 only (this rank's own counts)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"  rollout (rank 0): {p['prompts']}/{p['prompts_total']} prompts done, "
              f"{p['tokens']} tokens, {p['tokens_per_sec']:.0f} tokens/s, {p['seconds']:.0f}s",
              flush=True)


def _run_call(m, encs, call, sp, kv, pad_id, suppress, stop, compact, sync_every, prefill_tokens,
              static, graph, meter, interrupt):
    """Prefill, then decode every sample of the call. -> out_tok (B, G, T) long, out_lp (B, G, T)
    fp32, length (B, G) long, on the device (row b is encs[call.prompts[b]]; pad_id after a stop),
    the decode work [query rows fed, rows a batch that never shrinks would feed], and whether
    interrupt() ended the call early (live samples are then cut where they stood)."""
    dev, B, G, T, P = m.device, len(call.prompts), sp.n, sp.max_new_tokens, call.P
    S = call.tokens // B
    kv.start_call(B, S)
    logits, n_tok, delta, dtype = prefill(m, encs, call, kv, pad_id, prefill_tokens)  # (B, V)

    # Token 0: the G rows of a prompt repeat its logits, prompt-major like generate's
    # num_return_sequences, so one multinomial over B*G rows draws what generate would draw.
    tok, lp = sampling.sample(logits.repeat_interleave(G, 0), sp, suppress)              # (B*G,)
    tok, lp = tok.view(B, G), lp.view(B, G)
    del logits
    out_tok = torch.full((B, G, T), pad_id, dtype=torch.long, device=dev)
    out_lp = torch.zeros(B, G, T, dtype=torch.float32, device=dev)
    length = torch.full((B, G), T, dtype=torch.long, device=dev)
    row = torch.arange(B, device=dev)                         # (B',) batch row -> call row
    slot = torch.arange(G, device=dev).repeat(B, 1)           # (B', q) sample held by a slot
    alive = torch.ones(B, G, dtype=torch.bool, device=dev)    # (B', q)
    pos0 = (n_tok + delta).to(dev)                            # (B',) position of token 0
    cols = torch.arange(S, device=dev)
    seen = (cols[None, None] < n_tok.to(dev)[:, None, None]).expand(B, G, S).clone()  # (B', q, S)

    def record(t, tok, lp):
        """Write step t's tokens of the live slots; a slot that emits a stop id is done."""
        nonlocal alive
        r = row[:, None].expand_as(slot)
        out_tok[r, slot, t] = torch.where(alive, tok, pad_id)
        out_lp[r, slot, t] = torch.where(alive, lp, 0.0)
        meter.tokens += alive.sum()
        ends = alive & torch.isin(tok, stop)
        length[r, slot] = torch.where(ends, t + 1, length[r, slot])
        alive = alive & ~ends

    record(0, tok, lp)
    c, t = P, 1            # c: next free cache column; t: the step whose token is sampled next
    work, stopped = [0, 0], False
    if static:  # fixed shapes: all G slots, all S columns, one mask updated in place
        bias = _bias(seen, m.rep, dtype)                      # (B, 1, rep*G, S), contiguous
        bias4 = bias.view(B, m.rep, G, S)
        slots, col_buf = torch.arange(G, device=dev), torch.empty(G, dtype=torch.long, device=dev)
        tok_buf, pos_buf = tok.clone(), torch.empty(m.A, B, G, dtype=torch.long, device=dev)
        kv.mode = ("static", col_buf)
        step = lambda: m.head(m.hidden(tok_buf, pos_buf, bias, kv))            # (B, G, V)
    while t < T:
        if interrupt is not None and bool(interrupt()):  # local: no rank waits for another
            r = row[:, None].expand_as(slot)
            length[r, slot] = torch.where(alive, t, length[r, slot])
            stopped = True
            break
        if (t - 1) % sync_every == 0:  # reading device state is a sync: not every step on CUDA
            if not bool(alive.any()):
                break
            if compact and not static:
                counts = alive.sum(1)                         # (B',) live samples per row
                keep = (counts > 0).nonzero().squeeze(1)
                if len(keep) < len(row):  # prompts whose samples all ended leave (cache rows too)
                    kv.keep_rows(keep.tolist())
                    row, slot, alive, tok = row[keep], slot[keep], alive[keep], tok[keep]
                    seen, pos0 = seen[keep], pos0[keep]
                q = int(counts.max())
                if q < slot.shape[1]:  # rows shrink to their live samples: live slots first
                    order = torch.argsort((~alive).to(torch.int8), dim=1, stable=True)[:, :q]
                    slot, alive = slot.gather(1, order), alive.gather(1, order)
                    tok = tok.gather(1, order)
                    seen = seen.gather(1, order[..., None].expand(-1, -1, S))
        Bc, q = slot.shape
        meter.tick(B - Bc)
        # Feed step t-1's tokens at position n + (t-1) + delta; slot j writes cache column c + j.
        pos = (pos0 + (t - 1))[None, :, None].expand(m.A, Bc, q)               # (A, B', q)
        if static:
            bias4[:, :, slots, c + slots] = 0.0
            col_buf.copy_(c + slots)
            tok_buf.copy_(tok)
            pos_buf.copy_(pos)
            logits = graph.replay_or_capture(step) if graph is not None else step()
        else:
            j = torch.arange(q, device=dev)
            seen[:, j, c + j] = True
            K = -(-(c + q) // ALIGN) * ALIGN                  # <= S: S is a multiple of ALIGN
            kv.mode = ("decode", c, q, K)
            mask = _bias(seen[:, :, :K], m.rep, dtype)                         # (B', 1, rep*q, K)
            logits = m.head(m.hidden(tok, pos, mask, kv))                         # (B', q, V)
        c += q
        work[0], work[1] = work[0] + Bc * q, work[1] + B * G
        tok, lp = sampling.sample(logits.reshape(Bc * q, -1), sp, suppress)
        tok, lp = tok.view(Bc, q), lp.view(Bc, q)
        record(t, tok, lp)
        t += 1
    return out_tok, out_lp, length, work, stopped


class StepGraph:
    """A CUDA graph of one decode step (static shapes). The first call warms up on a side stream
    and captures; later calls replay. The warm-up runs the same step on the same inputs: it
    writes the same keys into the same cache columns, so it changes nothing. If capture fails (an
    op or a hook that syncs), it warns and the call goes on eagerly."""
    def __init__(self):
        self.graph, self.out, self.failed = None, None, False

    def replay_or_capture(self, step):
        if self.failed:
            return step()
        if self.graph is None:
            try:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        step()
                torch.cuda.current_stream().wait_stream(s)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.out = step()
            except Exception as e:  # noqa: BLE001 -- any capture failure: go on eagerly, loudly
                import warnings
                warnings.warn(f"rollout engine: CUDA graph capture failed ({type(e).__name__}: "
                              f"{e}); decoding eagerly")
                self.graph, self.failed = None, True
                torch.cuda.synchronize()
                return step()
        self.graph.replay()
        return self.out


class Rollout:
    """What generate returns. responses: [len(encs) * n] (T_i,) long on the CPU, sample g of
    prompt p at p*n + g, ending after the first stop id (or truncated at the budget); logprobs:
    the same shapes, fp32, each token's log-prob under the sampler; stats: the rollout's metrics;
    interrupted: interrupt() ended it early (then incomplete: never train on it)."""
    def __init__(self, responses, logprobs, stats, interrupted=False):
        self.responses, self.logprobs, self.stats = responses, logprobs, stats
        self.interrupted = interrupted


@torch.no_grad()
def generate(model, encs, sp, calls, *, pad_id, n_calls=None, all_sum=None, progress=show_progress,
             progress_every=10.0, interrupt=None, compact=True, sync_every=None,
             prefill_tokens=None, cuda_graph=False, static=False):
    """Sample sp.n responses for each prompt -> Rollout.
    model: a transformers causal LM / VLM with whole weights (under FSDP2: inside
      gathered(policy), called from policy's forward); it decodes in eval mode.
    encs: this rank's prompt encodings (calibrl.encode_prompt: input_ids (1, n), attention_mask,
      [mm_token_type_ids, pixel_values, image_grid_thw]), on the CPU or the device.
    calls: plan_calls([n of each prompt], sp.n, sp.max_new_tokens, max_tokens).
    n_calls: calls every rank runs (the max over ranks of len(calls)), the extra ones dummies
      without a forward; with all_sum (sums a float64 tensor over ranks), progress counts all
      ranks, at one all_sum per call. Neither is needed: no forward here runs a collective.
    progress: called with {prompts, prompts_total, tokens, seconds, tokens_per_sec} at most every
      progress_every seconds, never in a rollout shorter than that (default: a line on rank 0).
    interrupt: a callable checked before each call and once per decode step, on this rank alone
      (no collective); once it returns true the call stops where it stands, no later call runs a
      forward (dummies still meet all_sum), and the Rollout comes back with interrupted=True, the
      live samples cut where they stood and the prompts of later calls with empty responses.
    compact: prompts whose samples all ended leave the batch, and rows shrink to their live
      samples (the random draws then differ from transformers' generate; the distribution not).
    sync_every: decode steps between host checks of the finished samples (default 1 on a CPU, 8
      on CUDA, where a check stalls the launch queue); compaction and the stop happen there.
    prefill_tokens: prompt tokens per prefill forward (default min(32768, largest call // 4)).
    cuda_graph: capture the decode step as a CUDA graph (CUDA only; implies static).
    static: fixed-shape decoding -- all G slots, all S columns, no compaction: the graph's step.
    Resets the CUDA peak-memory counter (mem/rollout_peak_gb is the rollout's peak)."""
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise RuntimeError("rollout engine: generate needs whole weights: run it inside "
                           "distributed.gathered(policy)")
    m = RolloutModel(model)
    dev, G = m.device, sp.n
    host = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")
    encs = [{k: v.cpu() if k in host else v for k, v in e.items()} for e in encs]  # FSDP moves
    if cuda_graph and dev.type != "cuda":
        import warnings
        warnings.warn("rollout engine: cuda_graph needs a CUDA device; decoding eagerly")
    static = static or (cuda_graph and dev.type == "cuda")
    sync_every = sync_every or (8 if dev.type == "cuda" else 1)
    n_calls = len(calls) if n_calls is None else n_calls
    assert n_calls >= len(calls)
    assert sorted(i for c in calls for i in c.prompts) == list(range(len(encs)))
    max_call = max([c.tokens for c in calls], default=0)
    prefill_tokens = prefill_tokens or max(1, min(32768, max_call // 4))  # GPUs saturate far below
    suppress = (torch.tensor(sp.suppress_ids, dtype=torch.long, device=dev)
                if sp.suppress_ids else None)
    stop = torch.tensor(sp.stop_ids, dtype=torch.long, device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    kv = StaticKV(max_call)  # the arena: the largest call's positions, shared by every call
    responses = [torch.zeros(0, dtype=torch.long)] * (len(encs) * G)
    logprobs = [torch.zeros(0)] * (len(encs) * G)
    total = torch.tensor([float(len(encs)), 0.0], dtype=torch.float64)
    meter = _Meter(progress, progress_every, int((all_sum(total) if all_sum else total)[0]), dev)
    t0, n_tokens, work, stopped = time.time(), 0, [0, 0], False
    # eval mode: no dropout, and no gradient checkpointing (in training mode transformers 5.17
    # drops every layer's cache under it); the caller gets the model back in its own mode
    training = model.training
    with rollout_attention_on(model), contextlib.ExitStack() as restore:
        restore.callback(model.train, training)
        model.eval()
        for k in range(n_calls):
            mine = torch.zeros(2, dtype=torch.float64)           # prompts, tokens of this call
            stopped = stopped or (interrupt is not None and bool(interrupt()))
            if k < len(calls) and not stopped:  # a dummy call runs no forward: none needs one
                call = calls[k]
                graph = StepGraph() if static and cuda_graph and dev.type == "cuda" else None
                *outs, w, stopped = _run_call(m, encs, call, sp, kv, pad_id, suppress, stop,
                                              compact, sync_every, prefill_tokens, static, graph,
                                              meter, interrupt)
                out_tok, out_lp, length = [x.cpu() for x in outs]
                work = [a + b for a, b in zip(work, w)]
                for b, p in enumerate(call.prompts):
                    for g in range(G):
                        n = int(length[b, g])
                        responses[p * G + g] = out_tok[b, g, :n].clone()
                        logprobs[p * G + g] = out_lp[b, g, :n].clone()
                mine[:] = torch.tensor([len(call.prompts), float(length.sum())])
                n_tokens += int(length.sum())
            if all_sum:  # the other ranks' progress too: a rendezvous with them, once a call
                meter.prompts += int(all_sum(mine)[0])
            else:
                meter.prompts += int(mine[0])
    del kv
    dt = time.time() - t0
    stats = {"perf/rollout_tokens_per_sec": n_tokens / max(dt, 1e-9),
             "perf/rollout_calls": len(calls), "perf/rollout_max_call_tokens": max_call,
             "mem/rollout_peak_gb": distributed.peak_memory_gb(dev), "rollout/tokens": n_tokens,
             "rollout/seconds": dt, "rollout/decode_rows": work[0],
             "rollout/decode_rows_dense": work[1]}
    return Rollout(responses, logprobs, stats, interrupted=stopped)


def rollout_metrics(stats, groups):
    """The step's rollout metrics, over all ranks: perf/rollout_tokens_per_sec (every rank's
    tokens / the slowest rank's seconds), mem/rollout_peak_gb, perf/rollout_calls and
    perf/rollout_max_call_tokens (the largest of any rank), and rollout/logprob_gap: the
    length-weighted mean |sampler log-prob - pi_old log-prob| over the on-policy tokens, the
    sampler's fidelity (~1e-6 when both are exactly softmax(logits / T); top-p or a drift between
    the rollout and the scoring path shows here)."""
    rows = [r for g in groups for r in g.rows]
    gap = sum(float((r.sample_logp - r.old_logp).abs().sum()) for r in rows)
    n = sum(len(r.resp) for r in rows)
    tokens, gap, n = distributed.all_sum(torch.tensor([stats["rollout/tokens"], gap, n])).tolist()
    big = torch.tensor([stats[k] for k in ("rollout/seconds", "mem/rollout_peak_gb",
                                           "perf/rollout_calls", "perf/rollout_max_call_tokens")])
    seconds, peak, calls, biggest = distributed.all_max(big).tolist()
    extra = {k: distributed.all_max(stats[k]) for k in sorted(stats)  # --rollout vllm's sync
             if k in ("time/weight_sync", "mem/weight_sync_peak_gb")}  # the slowest rank's
    return {**extra, "perf/rollout_tokens_per_sec": tokens / max(seconds, 1e-9),
            "mem/rollout_peak_gb": peak, "perf/rollout_calls": calls,
            "perf/rollout_max_call_tokens": biggest, "rollout/logprob_gap": gap / max(n, 1)}


# -----------------------------------------------------------------------------
