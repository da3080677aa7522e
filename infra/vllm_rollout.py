"""
infra/vllm_rollout.py -- the rollout on vLLM (--rollout vllm): calibrl.generate's samples from
the serving engine the official code, verl, TRL and LUFFY sample with, colocated with the trainer.
(Not named vllm.py: it would shadow the package it imports.)
 1. One engine per rank (Engine): a vllm.LLM with tensor parallel 1, built once after the
    process group exists; under torchrun every rank builds it together (a collective), with
    distributed_executor_backend="external_launcher" and data_parallel_size = world, so that
    each rank samples its own prompts. vLLM is imported here only; without it, one line.
 2. Weights follow the policy (Engine.sync, before every generate): each parameter of the
    training model, one at a time (under FSDP2 through full_tensor, in the same order on every
    rank, so the gathers pair up), cast to the rollout dtype, into vLLM's own load_weights (which
    maps transformers' names onto its fused layers) via the worker's reload_weights (which redoes
    the CPU and quantised kernels' repacking); the first sync checks that every vLLM parameter
    was written. Then the prefix cache is reset (it holds keys of the old weights). On CUDA the
    engine sleeps (level 1: weights to host memory, KV cache freed) while the trainer updates.
 3. Exactly the sampler the loss assumes (departure 11, infra/sampling.py): softmax(logits / T)
    over every id but the suppressed ones, top-p only if asked; generation_config="vllm" (nothing
    from the model folder), top-k off, min-p 0, no repetition / presence / frequency penalty;
    the suppressed ids get -inf from SuppressIds, an engine-level logits processor (vLLM 0.32
    refuses per-request ones), before the temperature, as process_logits does; the stop ids are
    the tokenizer's (ignore_eos: vLLM's own end-of-sequence id is not ours). With
    logprobs_mode="processed_logprobs" each token comes with its log-prob under that sampler
    (rollout/logprob_gap compares it with pi_old; a gap over GAP_WARN is a warning, check_gap).
 4. Reproducible: every sample is its own request, seeded from (--seed, the step, the prompt's
    global index) with the G samples of a prompt at seed + j (as vLLM's own n > 1 does), so the
    same run samples the same tokens, a resumed run samples what an uninterrupted one did, and 1
    and N ranks sample the same tokens for the same prompt (vLLM's per-request generator does not
    depend on the batch; the logits may, on GPUs: see the README).
 5. Images: a prompt goes as its token ids with each image's run of placeholder tokens collapsed
    back to one and InternVL's <img> </img> around it dropped (vLLM expands it again; expanded ids
    would be expanded twice) plus the PIL images (calibrl.encode_prompt(..., pil=True))
    as multi_modal_data; the trainer's processor settings (min / max pixels) are vLLM's. A prompt
    whose expanded length in vLLM differs from calibrl's encoding is an error.
 6. Stops: the engine is stepped here (add_request, step), so interrupt() is checked between
    steps; under torchrun the ranks agree on it every step, since vLLM's data-parallel steps are
    collectives that must pair up. An interrupted rollout comes back with interrupted=True.

Shapes: P prompts of this rank, n samples per prompt, T_i tokens of response i, V vocabulary.
"""
import hashlib
import os
import time

import torch

from infra import distributed, engine, family

SEED_SPACING = 1024  # a prompt's n samples take seeds base .. base + n - 1: n <= this
GAP_WARN = {torch.float32: 1e-4}  # rollout/logprob_gap above this is a warning; exact: ~1e-6
GAP_WARN_LOW_PRECISION = 5e-2     # bf16 / fp16: two kernels' roundings differ by ~1e-3 a token
MISSING = "--rollout vllm needs vLLM: pip install vllm"


def import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise SystemExit(f"error: {MISSING} ({type(e).__name__}: {e})")
    return vllm


def suppress_ids_processor():
    """-> the engine-level logits processor class: the ids in a request's
    extra_args["calibrl_suppress"] get -inf before any sampling step (not argmax invariant, so
    vLLM runs it before the temperature and for greedy requests too), on the fp32 logits."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class _SuppressIds(LogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory):
            self.device, self.ids = device, {}      # batch row -> tuple of ids
            self.rows = self.cols = None

        def is_argmax_invariant(self):
            return False

        def update_state(self, batch_update: "BatchUpdate | None"):
            changed = process_dict_updates(self.ids, batch_update, lambda params, _, __: (
                tuple((params.extra_args or {}).get("calibrl_suppress", ())) or None))
            if changed or self.rows is None:  # the rows move as requests come and go
                pairs = [(r, i) for r, ids in self.ids.items() for i in ids]
                self.rows = torch.tensor([r for r, _ in pairs], dtype=torch.long,
                                         device=self.device)
                self.cols = torch.tensor([i for _, i in pairs], dtype=torch.long,
                                         device=self.device)

        def apply(self, logits):                    # (rows in the batch, V) fp32
            if self.rows is not None and len(self.rows):
                logits[self.rows, self.cols] = float("-inf")
            return logits

    return _SuppressIds


def request_seed(seed, key, index):
    """The seed of sample 0 of the prompt at global position `index` of the rollout `key` (the
    step, or "eval"); sample j takes + j. A hash, so that no two (seed, key, index) share a range
    of SEED_SPACING seeds (up to collisions at 2^-48); below 2^63 as torch generators want."""
    digest = hashlib.sha256(f"calibrl {seed} {key} {index}".encode()).digest()
    return int.from_bytes(digest[:6], "little") * SEED_SPACING


def collapse_images(ids, image_token_id, wrap=()):
    """ids (n,) of an encoded prompt -> a list of ints with each image's expansion undone: its run
    of image_token_id (the processor's placeholders) collapsed to one token, and the wrap (start,
    end) ids the processor put around the run (InternVL's <img> </img>) dropped, since vLLM's
    replacement adds them again (vllm/model_executor/models/interns1.py: <IMG_CONTEXT> ->
    <img> <IMG_CONTEXT> * n </img>; Qwen2-VL's: <|image_pad|> -> <|image_pad|> * n)."""
    start, end = wrap or (None, None)
    out = []
    for t in ids.tolist():
        if out and out[-1] == image_token_id and t in (image_token_id, end):
            continue                                # the rest of the run, and its end
        if t == image_token_id and out and out[-1] == start:
            out.pop()                               # the run's start
        out.append(t)
    return out


def build_request(enc, image_token_id, wrap=()):
    """One encoded prompt (calibrl.encode_prompt: input_ids (1, n), and for a VLM its images) ->
    vLLM's prompt: {prompt_token_ids[, multi_modal_data]}; the images un-expanded (item 5)."""
    ids = enc["input_ids"][0]
    images = enc.get("images") or []
    if not images:
        return {"prompt_token_ids": ids.tolist()}
    return {"prompt_token_ids": collapse_images(ids, image_token_id, wrap),
            "multi_modal_data": {"image": list(images)}}


def check_prompt_length(p, got, want):
    """Item 5: vLLM must see the prompt calibrl encoded (got: its expanded length, want: ours)."""
    if got != want:
        raise RuntimeError(f"--rollout vllm: prompt {p} is {got} tokens in vLLM but {want} in "
                           "calibrl's encoding: the two processors differ (image sizes? min/max "
                           "pixels? the image placeholders?)")


def processor_kwargs(processor):
    """The trainer's image-processor settings that decide how many tokens an image takes, for
    vLLM's copy of the processor: the same images then expand to the same lengths."""
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        return None
    kw = {k: getattr(ip, k) for k in ("min_pixels", "max_pixels") if getattr(ip, k, None)}
    if getattr(ip, "size", None):
        kw["size"] = dict(ip.size)
    return kw or None


def check_gap(step, log, dtype, top_p, say):
    """A warning when vLLM's log-probs of its own samples are not pi_old's (they should agree to
    ~1e-6 in fp32): the likely causes, named."""
    gap = log.get("rollout/logprob_gap", 0.0)
    limit = GAP_WARN.get(dtype, GAP_WARN_LOW_PRECISION)
    if gap > limit and top_p == 1.0:  # below 1, vLLM's log-probs are top-p's renormalised ones
        say(f"warning: step {step}: rollout/logprob_gap {gap:.1e} > {limit:.0e}: vLLM did not "
            "sample from pi_old. Likely: the weights did not reach vLLM (time/weight_sync), a "
            "sampling setting vLLM took from elsewhere (generation_config, penalties, top-k), "
            "or the two kernels' precision (bf16: try --dtype float32 to tell)")


class Engine:
    """One rank's vLLM engine and what it needs to sample calibrl's way."""

    def __init__(self, model_path, model, processor, tok, args, dtype, device):
        vllm = import_vllm()
        world = distributed.world_size()
        # in-process: the weight sync hands vLLM tensors (and a callable) directly
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if device.type == "cpu":  # the CPU backend's defaults: a large KV cache, pinned threads
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")                 # GiB
            if world > 1:  # two ranks on one NUMA node must not bind the same cores
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        cuda = device.type == "cuda"
        kw = dict(tensor_parallel_size=1, seed=args.seed, dtype=str(dtype).split(".")[-1],
                  enforce_eager=not cuda, generation_config="vllm",
                  logprobs_mode="processed_logprobs",
                  max_model_len=args.max_prompt_length + args.max_response_length,
                  logits_processors=[suppress_ids_processor()], enable_prefix_caching=True,
                  max_num_seqs=args.vllm_max_seqs,
                  max_num_batched_tokens=max(args.vllm_max_batched_tokens,
                                             args.max_prompt_length + args.max_response_length),
                  mm_processor_kwargs=processor_kwargs(processor))
        if world > 1:
            kw.update(distributed_executor_backend="external_launcher", data_parallel_size=world)
        if cuda:
            kw.update(gpu_memory_utilization=args.vllm_gpu_memory, enable_sleep_mode=True)
        try:
            self.llm = vllm.LLM(model_path, **kw)
        except Exception as e:  # noqa: BLE001 -- memory, an unsupported model: one line
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise SystemExit(f"error: --rollout vllm: vLLM could not start on {model_path} "
                             f"({type(e).__name__}: {first})")
        self.vllm, self.cuda, self.dtype, self.args = vllm, cuda, dtype, args
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self.wrap = family.of(model).image_wrap(tok)  # InternVL's <img> </img>, else ()
        self.checked, self.calls = False, 0
        distributed.CLOSERS.append(self.close)  # before the process group, which vLLM uses
        if cuda:
            self.llm.sleep(level=1)  # the trainer has the GPU until the first rollout

    def close(self):
        """Shut the engine down (its process groups, and the default one if vLLM made it)."""
        self.llm.llm_engine.engine_core.shutdown()

    # -- item 2: weights follow the policy ------------------------------------------------
    def sync(self, model):
        """Push model's current weights into vLLM. -> seconds, peak memory (GB) of the sync."""
        t0 = time.time()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.llm.wake_up(tags=["weights"])  # the weights back, the KV cache not yet

        def weights():  # one parameter at a time: at most one whole tensor held at once
            for name, p in model.named_parameters():  # the same order on every rank
                full = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2: a gather
                yield name, full.detach().to(self.dtype)

        missing = self.llm.collective_rpc(_reload, args=(weights(),))[0]
        if not self.checked:
            if missing:  # a parameter vLLM kept from the folder would silently sample stale
                raise RuntimeError(f"--rollout vllm: the weight sync left {len(missing)} vLLM "
                                   f"parameters unwritten: {', '.join(missing[:5])}")
            self.checked = True
        self.llm.reset_prefix_cache()  # cached keys and values are the old weights'
        if self.cuda:
            self.llm.wake_up(tags=["kv_cache"])
        return time.time() - t0, distributed.peak_memory_gb(next(model.parameters()).device)

    # -- items 3-6: the rollout -----------------------------------------------------------
    def generate(self, model, encs, sp, key, interrupt=None):
        """sp.n samples per prompt of encs (this rank's, strided: local p is global
        p * world + rank) -> engine.Rollout, as engine.generate returns it. key: the step, or
        "eval" (the seeds' stream). Every rank calls it together (the sync and vLLM's steps are
        collectives under torchrun)."""
        sync_s, sync_gb = self.sync(model)
        rank, world = distributed.get_rank(), distributed.world_size()
        assert sp.n <= SEED_SPACING, f"{sp.n} samples > SEED_SPACING {SEED_SPACING}"
        eng, t0 = self.llm.llm_engine, time.time()
        self.calls += 1
        ids = {}                                              # request id -> (prompt, sample)
        for p, enc in enumerate(encs):
            base = request_seed(self.args.seed, key, p * world + rank)
            prompt = build_request(enc, self.image_token_id, self.wrap)
            for j in range(sp.n):
                params = self.vllm.SamplingParams(
                    n=1, temperature=0.0 if sp.greedy else sp.temperature,
                    top_p=1.0 if sp.greedy else sp.top_p, top_k=0, min_p=0.0,
                    repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                    max_tokens=sp.max_new_tokens, logprobs=0, seed=base + j,
                    stop_token_ids=list(sp.stop_ids), ignore_eos=True, detokenize=False,
                    extra_args={"calibrl_suppress": list(sp.suppress_ids)},
                    output_kind=self.vllm.sampling_params.RequestOutputKind.FINAL_ONLY)
                rid = f"{self.calls}-{p}-{j}"
                eng.add_request(rid, prompt, params)
                ids[rid] = (p, j)
        done, stopped = {}, False
        while True:
            stop = interrupt is not None and bool(interrupt())
            if world > 1:  # agreed, so that every rank leaves vLLM's paired steps together
                stop = distributed.all_max(float(stop)) > 0
            if stop:
                eng.abort_request([r for r in ids if r not in done])
                stopped = True
                break
            if not eng.has_unfinished_requests():  # under torchrun: any rank's (a collective)
                break
            for out in eng.step():  # FINAL_ONLY: finished requests only
                done[out.request_id] = out
        if self.cuda:
            self.llm.sleep(level=1)
        dt = time.time() - t0
        responses = [torch.zeros(0, dtype=torch.long)] * (len(encs) * sp.n)
        logprobs = [torch.zeros(0)] * (len(encs) * sp.n)
        n_tokens = kv = 0
        for rid, out in done.items():
            p, j = ids[rid]
            want = encs[p]["input_ids"].shape[1]
            check_prompt_length(p, len(out.prompt_token_ids), want)
            c = out.outputs[0]
            toks = torch.tensor(c.token_ids, dtype=torch.long)                    # (T_i,)
            responses[p * sp.n + j] = toks
            logprobs[p * sp.n + j] = torch.tensor([d[t].logprob for d, t in
                                                   zip(c.logprobs, c.token_ids)])  # (T_i,) fp32
            n_tokens += len(toks)
            kv += len(toks) + (want if j == 0 else 0)  # a prompt's KV once (prefix caching)
        stats = {"perf/rollout_tokens_per_sec": n_tokens / max(dt, 1e-9),
                 "perf/rollout_calls": 1, "perf/rollout_max_call_tokens": kv,
                 "mem/rollout_peak_gb": distributed.peak_memory_gb(
                     next(model.parameters()).device),
                 "rollout/tokens": n_tokens, "rollout/seconds": dt,
                 "rollout/decode_rows": n_tokens, "rollout/decode_rows_dense": n_tokens,
                 "time/weight_sync": sync_s, "mem/weight_sync_peak_gb": sync_gb}
        return engine.Rollout(responses, logprobs, stats, interrupted=stopped)


def _reload(worker, weights):
    """On vLLM's worker (in this process): reload_weights from the iterator, recording which of
    the model's parameters its load_weights wrote. -> the names of those it did not."""
    model = worker.model_runner.get_model()
    written = {}
    real = type(model).load_weights
    model.load_weights = lambda ws: written.setdefault("names", real(model, ws))
    try:
        worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    finally:
        del model.load_weights
    names = written.get("names")
    if names is None:  # a model whose load_weights returns nothing: nothing to check against
        return []
    return sorted({n for n, _ in model.named_parameters()} - set(names))
