"""
infra/packing.py -- the micro-batches of the pi_old pass and the update: packed or padded.

Packed (--pack on, the default): the pi_old pass and the update without padding, each prompt (its
images included) forwarded once per micro-batch for all of its rows, not once per row. Apart from
the engine: the two share no code, only the model-family block (infra/family.py: positions, image
inputs and features).

The padded path (calibrl.collate, --micro-batch-size rows per forward: micro_batches, pad_rows)
left-pads prompts and right-pads responses to the longest row of a micro-batch (~43% of the
positions at the paper preset are padding), builds a dense (R, 1, S, S) mask and forwards a
prompt and its images for each of its G + 1 rows. Packed, a micro-batch is ONE sequence: per
distinct prompt its L_k tokens, then the responses of its rows (blocks); the prompt attends
causally to itself, each response to its prompt and causally to itself; every token keeps the
position ids of its unpadded row. --pack rows lays each row out as its prompt + its response
instead (seqlens), each row attending to itself only; the rows of a prompt still share one vision
forward. The pieces, in the order a pass uses them:
  plan_micro_batches / packed_micro_batches   rows -> micro-batches of at most max_tokens tokens
  pack_rows -> Pack                           a micro-batch -> packed ids, positions, indices
  enable_packed_attention / packed_sdpa       the decoder's attention, once, at load time
  packed_hidden                               one vision pass, one decoder pass -> (N, H)
  count_forward, perf_metrics                 perf/positions, pad_frac, vision_encodes, mem
Shapes: R rows, row i = prompt (L_i) + response (T_i); S packed positions: sum over distinct
prompts k of L_k plus sum_i T_i (shared), sum_i (L_i + T_i) (rows); N = sum_i T_i response tokens,
F image features of the micro-batch's distinct prompts, K image tokens placed (K = F shared; K >= F
rows, where rows repeat a prompt). Logits at p predict the token at p + 1, as in the padded path
(where positions [L-1, L+T-1) score the response): a response's first token is scored by its
prompt's last position, its token t by its own token t - 1.

transformers facts this relies on (5.17 and 5.24 alike; the tests check the result):
 - Qwen2/2.5-VL's own SDPA path separates packed rows only with 4-row position ids (row 0: per-row
   text positions), attention_mask=None AND use_cache=False, and then builds a dense (1, 1, S, S)
   mask. With 3-row ids, the default cache or an all-ones mask the rows silently run as ONE causal
   sequence (hidden states off by O(1), no error). So the decoder gets its 3-row ids, no cache and
   a dict of prepared masks that are all None (the form generate passes): transformers builds no
   mask, and packed_sdpa, registered through AttentionInterface, separates the rows itself.
 - The attention function is looked up by name at every call, also when backward recomputes a
   gradient-checkpointed layer: the name is set once and for good (set and restored around the
   forward, the recompute would run plain SDPA and torch raises a CheckpointError).
 - FlexAttention needs no torch.compile on a CPU in torch 2.13 but has no CPU backward there, and
   eager it is ~100x slower than per-row SDPA; varlen_attn is CUDA-only. Per-row SDPA runs both on
   the CPU and on a GPU (causal, no mask: SDPA may take its flash kernel). A shared prompt's
   responses pass a (T, L + T) bool mask: CUDA's memory-efficient kernel takes it; the CPU runs
   SDPA's math kernel, which keeps each response's attention probabilities for the backward
   (data/bench_packing.py's CPU peak memory shows it).
 - Rotary cos/sin are computed in float32 from absolute positions: a row's exact positions
   reproduce the padded path bit for bit (a constant shift would not: ~3e-5 at a shift of 1,000).
"""
from dataclasses import dataclass

import torch

from infra import distributed, family

PACKED_ATTENTION = "packed_sdpa"


def micro_batches(items, size):
    """Chunks of `size` items, padded with None (dummy work) so every rank runs as many forwards."""
    return distributed.in_step([items[i:i + size] for i in range(0, len(items), size)])


def pad_rows(vectors, T):
    """[(T_i,) tensors] -> (len, T), zero past each vector's end."""
    out = torch.zeros(len(vectors), T, dtype=vectors[0].dtype)
    for i, v in enumerate(vectors):
        out[i, :min(len(v), T)] = v[:T]
    return out


def plan_micro_batches(tokens, groups, max_tokens, prompt_tokens=None):
    """One rank's rows -> [[row indices]]: micro-batches of at most max_tokens tokens.
    tokens[i]: what row i costs packed; groups[i]: its prompt (any hashable; the rows of a prompt
    in one micro-batch share one vision forward); prompt_tokens: {group: L}, charged once per
    micro-batch that holds any of the group's rows (the shared prompt: tokens[i] is then the
    response alone), or None (rows: tokens[i] is the prompt + response).

    First-fit-decreasing on groups, balanced: k = ceil(total / max_tokens) micro-batches, the fewest
    forwards possible. Groups, largest first, each go whole into the least-loaded micro-batch that
    holds them, so loads come out even rather than full-then-empty. A group that fits none whole is
    cut: its rows, largest first, fill the emptiest micro-batches (a group is cut only where keeping
    it whole would cost a forward). If even its rows do not fit, k grows by one and packing starts
    over. Rows keep their order inside a micro-batch, micro-batches are ordered by their first row;
    ties go to the lower index: deterministic. A row over the budget raises ValueError."""
    assert len(groups) == len(tokens)
    head = lambda g: (prompt_tokens or {}).get(g, 0)  # noqa: E731
    for i, t in enumerate(tokens):
        if t + head(groups[i]) > max_tokens:
            raise ValueError(f"row {i} has {t + head(groups[i])} tokens (prompt + response) > "
                             f"--max-tokens-per-micro-batch {max_tokens}")
    by_group = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    size = lambda g, rows: head(g) + sum(tokens[i] for i in rows)  # noqa: E731
    units = sorted(by_group.items(), key=lambda u: (-size(*u), u[1][0]))
    k, bins = max(1, -(-sum(size(*u) for u in units) // max_tokens)), []
    while units:
        bins, load, has = [[] for _ in range(k)], [0] * k, [set() for _ in range(k)]
        for g, rows in units:
            fits = [b for b in range(k) if load[b] + size(g, rows) <= max_tokens]
            if fits:  # whole, into the least-loaded micro-batch that holds it
                b = min(fits, key=lambda b: (load[b], b))
                bins[b], load[b] = bins[b] + rows, load[b] + size(g, rows)
                has[b].add(g)
                continue
            rest = sorted(rows, key=lambda i: (-tokens[i], i))
            while rest:  # cut: its rows fill the emptiest micro-batches
                b, put = min(range(k), key=lambda b: (load[b], b)), []
                for i in rest:
                    cost = tokens[i] + (0 if g in has[b] else head(g))
                    if load[b] + cost <= max_tokens:
                        put.append(i)
                        load[b] += cost
                        has[b].add(g)
                if not put:
                    break
                bins[b] += put
                rest = [i for i in rest if i not in put]
            if rest:
                break  # this group does not fit k micro-batches: one more, and start over
        else:
            break  # every group placed
        k += 1
    return sorted((sorted(b) for b in bins if b), key=lambda b: b[0])


def packed_micro_batches(items, tokens, groups, max_tokens, prompt_tokens=None):
    """micro_batches by tokens: items -> chunks of at most max_tokens tokens (plan above),
    padded with None (dummy work, in_step) so every rank runs as many forwards."""
    plan = plan_micro_batches(tokens, groups, max_tokens, prompt_tokens)
    return distributed.in_step([[items[i] for i in mb] for mb in plan])


@dataclass
class Pack:
    """One packed micro-batch, built on the CPU by pack_rows; .to(device) before the forward."""
    input_ids: torch.Tensor      # (1, S)
    position_ids: torch.Tensor   # (3, 1, S) M-RoPE (temporal, height, width); a text LM: (1, S)
    seqlens: tuple               # rows: (R,) ints L_i + T_i, row i at [o_i, o_i + L_i + T_i)
    blocks: tuple                # shared: per prompt (L_k, (T_i of its rows)): prompt, responses
    lengths: tuple               # (R,) ints T_i
    score_index: torch.Tensor    # (N,) packed positions whose hidden states score the response
    targets: torch.Tensor        # (N,) the response tokens they predict
    row_ids: torch.Tensor        # (N,) each response token's row i ...
    cols: torch.Tensor           # (N,) ... and its place t in that response
    images: dict = None          # the distinct prompts' images, once each (family.image_inputs)
    image_index: torch.Tensor = None     # (K,) packed positions of every row's image tokens
    feature_index: torch.Tensor = None   # (K,) which of the F image features each one receives

    def to(self, device):
        move = lambda v: v.to(device) if torch.is_tensor(v) else v  # noqa: E731
        return Pack(**{k: {n: move(x) for n, x in v.items()} if isinstance(v, dict) else move(v)
                       for k, v in vars(self).items()})

    def rows(self, x):
        """(N, ...) per response token -> (R, T, ...) per row, T = max T_i, zero past each row's
        end: the padded path's layout (calibrl.policy_loss's inputs)."""
        out = x.new_zeros((len(self.lengths), max(self.lengths)) + x.shape[1:])
        return out.index_put((self.row_ids, self.cols), x)                       # (R, T, ...)

    def tokens(self, loss):
        """Eq. C's inputs as calibrl.update builds them, (R, T) and (R,) -> the per-token form of
        the fused op's flat entry fused_policy_loss_tokens: old_logp / expert_logp (N,), row_ids
        (N,); no mask (every packed response token counts)."""
        at = lambda x: x[self.row_ids, self.cols]                                # (N,)  # noqa
        flat = {k: v for k, v in loss.items() if k != "mask"}
        return {**flat, "old_logp": at(loss["old_logp"]), "expert_logp": at(loss["expert_logp"]),
                "row_ids": self.row_ids}


def pack_rows(model, encs, responses, share_prompts=True):
    """Rows -> one Pack. encs[i]: row i's prompt encoding (calibrl.encode_prompt: input_ids
    (1, L_i), attention_mask, for a VLM mm_token_type_ids, pixel_values, image_grid_thw);
    responses[i]: (T_i,) ids. Rows whose encoding is the same object (calibrl passes each group's
    g.enc) share one vision forward, and with share_prompts one prompt: the packed sequence is then
    each distinct prompt once, followed by its rows' responses (blocks), and a response attends to
    its prompt and to itself (packed_sdpa). Without it every row is its prompt + its response
    (seqlens). Uses the model's family block (positions, image features), no weights: it runs on
    the CPU."""
    fam = family.of(model)
    prompt_of, prompts, F = {}, [], 0   # id(enc) -> k; per distinct prompt k: its (L,) ids etc.
    for i, e in enumerate(encs):
        if id(e) in prompt_of:
            prompts[prompt_of[id(e)]]["rows"].append(i)
            continue
        if "pixel_values_videos" in e:
            raise NotImplementedError("packing rows with videos")
        ids = e["input_ids"][0]                                                  # (L,)
        if fam.image_token_id is not None and ids[-1] == fam.image_token_id:
            raise ValueError("a prompt ending in an image token: its response positions would "
                             "not continue its text positions")
        pos = fam.positions(e)[0]  # the unpadded prompt's, images included, by the model's rule
        n_feat = fam.num_features(e)
        prompt_of[id(e)] = len(prompts)
        prompts.append(dict(enc=e, ids=ids, pos=pos, n_feat=n_feat, first_feat=F, rows=[i]))
        F += n_feat                                                              # pos (A, L)
    parts = {k: [] for k in ("ids", "pos", "score", "targets", "row_ids", "cols", "img", "feat")}
    o = 0                                               # the packed offset of the next token

    def put_prompt(p):
        nonlocal o
        parts["ids"].append(p["ids"])
        parts["pos"].append(p["pos"])
        if p["n_feat"]:
            at = (p["ids"] == fam.image_token_id).nonzero()[:, 0]                # (n_feat,)
            assert len(at) == p["n_feat"], f"{len(at)} image tokens, {p['n_feat']} image features"
            parts["img"].append(o + at)
            parts["feat"].append(p["first_feat"] + torch.arange(p["n_feat"]))
        o += len(p["ids"])
        return o - 1                                    # the prompt's last token predicts y_0

    def put_response(p, i, last):
        nonlocal o
        r, T = responses[i], len(responses[i])
        parts["ids"].append(r.to(p["ids"].dtype))
        # the response is text after the prompt's last (text) token: +1 per token, in every row
        parts["pos"].append(p["pos"][:, -1:] + 1 + torch.arange(T))            # (A, T)
        score = o - 1 + torch.arange(T)                 # p predicts p + 1 ...
        score[:1] = last                                # ... and y_0 is the prompt's last token's
        parts["score"].append(score)
        parts["targets"].append(r)
        parts["row_ids"].append(torch.full((T,), i))
        parts["cols"].append(torch.arange(T))
        o += T

    if share_prompts:  # each prompt once, then its rows' responses
        for p in prompts:
            last = put_prompt(p)
            for i in p["rows"]:
                put_response(p, i, last)
        seqlens = None
        blocks = tuple((len(p["ids"]), tuple(len(responses[i]) for i in p["rows"])) for p in prompts)
    else:  # each row its prompt and its response
        for i, e in enumerate(encs):
            p = prompts[prompt_of[id(e)]]
            put_response(p, i, put_prompt(p))
        seqlens = tuple(e["input_ids"].shape[1] + len(r) for e, r in zip(encs, responses))
        blocks = None
    images = fam.image_inputs([p["enc"] for p in prompts if p["n_feat"]])
    cat = lambda key, dim=0: torch.cat(parts[key], dim) if parts[key] else None  # noqa: E731
    return Pack(input_ids=cat("ids")[None],                                      # (1, S)
                position_ids=fam.position_ids(cat("pos", 1)[:, None]),  # (3, 1, S) M-RoPE, (1, S)
                seqlens=seqlens, blocks=blocks, lengths=tuple(len(r) for r in responses),
                score_index=cat("score"), targets=cat("targets"), row_ids=cat("row_ids"),
                cols=cat("cols"), images=images or None,
                image_index=cat("img"), feature_index=cat("feat"))


def packed_sdpa(module, query, key, value, attention_mask, packed_seqlens=None, packed_blocks=None,
                **kwargs):
    """query (1, nh, S, hd), key / value (1, nkv, S, hd) -> (1, S, nh, hd), None.
    packed_seqlens (R,): causal SDPA on each row's slice alone, so no (S, S) mask exists and a row
    costs O(n_i^2), not O(S^2). packed_blocks ((L, (T_1, ..)), ..): per block a prompt of L tokens,
    causal on itself, then responses, each attending to the prompt's keys and values and causally to
    its own: a (T_i, L + T_i) mask, the prompt's columns all visible. A Python loop over a few dozen
    slices per layer. With neither: transformers' SDPA unchanged (generate, the padded path)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if packed_seqlens is None and packed_blocks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None or query.shape[0] != 1 or kwargs.get("sliding_window"):
        raise ValueError("packed attention takes one packed row, no mask, no sliding window")
    kwargs.pop("is_causal", None)
    causal = lambda q, k, v: sdpa_attention_forward(  # noqa: E731
        module, q, k, v, None, is_causal=True, **kwargs)[0]                      # (1, n, nh, hd)
    if packed_blocks is None:
        rows = zip(*(x.split(packed_seqlens, 2) for x in (query, key, value)))  # (1, n*, n_i, hd)
        return torch.cat([causal(q, k, v) for q, k, v in rows], 1), None        # (1, S, nh, hd)
    rep = query.shape[1] // key.shape[1]  # query head h reads KV head h // rep (repeat_kv)
    drop = kwargs.get("dropout", 0.0)  # the module passes 0 in eval mode
    out, o = [], 0
    for L, Ts in packed_blocks:
        kp, vp = key[:, :, o:o + L], value[:, :, o:o + L]                        # (1, nkv, L, hd)
        out.append(causal(query[:, :, o:o + L], kp, vp))
        o += L
        for T in Ts:  # plain torch SDPA: transformers' would fold a T = 1 query's heads, mask too
            k = torch.cat([kp, key[:, :, o:o + T]], 2).repeat_interleave(rep, 1)  # (1, nh, L+T, hd)
            v = torch.cat([vp, value[:, :, o:o + T]], 2).repeat_interleave(rep, 1)
            seen = torch.ones(T, L + T, dtype=torch.bool, device=query.device).tril(L)  # (T, L+T)
            y = torch.nn.functional.scaled_dot_product_attention(
                query[:, :, o:o + T], k, v, attn_mask=seen, dropout_p=drop,
                scale=kwargs.get("scaling"))                                     # (1, nh, T, hd)
            out.append(y.transpose(1, 2))
            o += T
    return torch.cat(out, 1), None                                               # (1, S, nh, hd)


def enable_packed_attention(model):
    """At load time (calibrl.load_model, before sharding): register packed_sdpa, with SDPA's mask
    builder under the same name, and make it the decoder's attention. Everything but a packed
    forward still gets plain SDPA (generate and the padded path: tested bit for bit); the vision
    tower keeps its own attention (it separates images by cu_seqlens). A model on another attention
    is left alone; packed_hidden then refuses to run."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    config = family.of(model).text_decoder().config
    if config._attn_implementation == "sdpa":
        config._attn_implementation = PACKED_ATTENTION
    return model


def packed_hidden(model, pack):
    """The packed forward, inside calibrl.Policy.forward (under FSDP2 whatever touches the weights
    runs inside the root's forward) -> hidden states (N, H) at the response-scoring positions.
    One vision forward for the micro-batch's distinct prompts, its features placed at every row's
    image tokens (autograd sums the rows' gradients into the one forward), one decoder forward.
    Under torchrun a micro-batch without images still runs the vision tower (a blank image, times
    0): FSDP's gathers of the vision unit must pair up with the ranks that have images (otherwise
    gloo fails on mismatched collectives and NCCL hangs)."""
    fam = family.of(model)
    lm = fam.text_decoder()
    if lm.config._attn_implementation != PACKED_ATTENTION:
        raise ValueError(f"packing needs SDPA attention, set up by enable_packed_attention; the "
                         f"model uses {lm.config._attn_implementation!r}: run with --pack off")
    embeds = model.get_input_embeddings()(pack.input_ids)                        # (1, S, H)
    if pack.images:
        feats = fam.image_features(**pack.images)                                # (F, H)
        embeds = embeds.index_put((torch.zeros_like(pack.image_index), pack.image_index),
                                  feats[pack.feature_index].to(embeds.dtype))    # (1, S, H)
    elif distributed.active() and hasattr(model.config, "vision_config"):
        blank = fam.blank_features(embeds)                                       # (1, H)
        embeds = embeds + 0 * blank.sum().to(embeds.dtype)
    kinds = getattr(lm.config, "layer_types", None) or ["full_attention"]
    no_masks = {kind: None for kind in kinds}  # "prepared", all None: transformers builds none
    hidden = lm(inputs_embeds=embeds, position_ids=pack.position_ids, attention_mask=no_masks,
                use_cache=False, packed_seqlens=pack.seqlens,
                packed_blocks=pack.blocks).last_hidden_state                     # (1, S, H)
    return hidden[0, pack.score_index]                                           # (N, H)


FORWARDS = dict(positions=0, padding=0, images=0, rows=0)  # this rank's, since perf_metrics


def count_forward(encs, responses, packed, weight=1.0, shared=False):
    """One forward of the pi_old pass or the update, into FORWARDS. Padded (calibrl.collate):
    R * (L + T) positions, every row's images. Packed: no padding, each distinct prompt's images
    once, and with shared each distinct prompt's tokens once. rows: what one unpadded forward per
    row would cost, sum (L_i + T_i). A weight-0 dummy forward (in_step) scores nothing: all its
    positions count as padding."""
    real = sum(e["input_ids"].shape[1] + len(r) for e, r in zip(encs, responses))
    encoded = {id(e): e for e in encs}.values() if packed else encs
    if packed:
        positions = real if not shared else (sum(e["input_ids"].shape[1] for e in encoded)
                                             + sum(len(r) for r in responses))
    else:
        L, T = max(e["input_ids"].shape[1] for e in encs), max(len(r) for r in responses)
        positions = len(encs) * (L + T)
    images = sum(family.num_images(e) for e in encoded)
    FORWARDS["positions"] += positions
    FORWARDS["padding"] += positions - (min(real, positions) if weight else 0)
    FORWARDS["images"] += images
    FORWARDS["rows"] += real if weight else 0


def perf_metrics(encs, device):
    """The step's perf metrics over all ranks, of the pi_old pass and the update: perf/positions
    (positions forwarded), perf/positions_saved (1 - those / one unpadded forward per row: the
    shared prompts' saving; 0 for rows packed alone, below 0 with padding), perf/pad_frac (padding /
    positions), perf/vision_encodes (images encoded / images in the step's prompts `encs`), and
    mem/peak_gb (the largest rank's); then the counters start afresh."""
    step_images = sum(family.num_images(e) for e in encs)
    t = distributed.all_sum(torch.tensor([FORWARDS["positions"], FORWARDS["padding"],
                                          FORWARDS["images"], step_images, FORWARDS["rows"]],
                                         dtype=torch.float64))
    peak = distributed.all_max(distributed.peak_memory_gb(device))
    FORWARDS.update(positions=0, padding=0, images=0, rows=0)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return {"perf/positions": t[0].item(),
            "perf/positions_saved": (1 - t[0] / t[4]).item() if t[4] else 0.0,
            "perf/pad_frac": (t[1] / t[0].clamp(min=1)).item(),
            "perf/vision_encodes": (t[2] / t[3].clamp(min=1)).item(), "mem/peak_gb": peak}
