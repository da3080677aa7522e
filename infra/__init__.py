"""
infra -- the machinery beside calibrl.py that is not the algorithm, one concern a file.

calibrl.py reads as the paper (prompts, reward, rollout, log-probs, Eq. A-C, the update, the loop)
and imports these rooms by name. Each room imports only rooms above it in this list, none imports
calibrl (calibrl passes in what they need: its prompt builder, its answer check), so there is no
circle:

  family        what differs per model family: positions, image inputs and features, the vision
                tower, image-structure ids; load_processor
  distributed   torchrun and FSDP2: ranks, collectives, in_step (ranks in step), shard, gathered
  sampling      the sampler the loss assumes: Sampling, process_logits, sample
  engine        the rollout engine: calls by a token budget, prefill once, a static KV arena
  vllm_rollout  the rollout on vLLM (--rollout vllm): one engine a rank, weights synced, exact
  packing       micro-batches of the pi_old pass and the update, padded or packed
  checker       the answer checker's sandbox: math-verify in a worker that can be killed
  data          reading and checking every row up front (one report), the data order
  rundir        the run folder's lock, whole-line and atomic writes, stop signals, the exit path
  metrics       weighted means over ranks, the metrics log (stdout, metrics.jsonl, TensorBoard)
  checkpoints   save, verify, fall back, resume exactly; nothing in a folder runs code
  flags         every flag's range, what `auto` means, the demo's defaults, the kernel file
"""
