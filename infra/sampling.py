"""
infra/sampling.py -- the sampler the loss assumes, exactly (departure 11).

pi_old is softmax(logits / T) over every id but the suppressed ones (image-structure ids), top-p
only when asked, nothing from the model folder's generation_config.json. Apart from the rollout
engine because it is the contract any rollout backend must meet, and the one the log-probs of
calibrl.token_logprobs are tested against. Shapes: N rows of logits, V vocabulary.
"""
import torch


class Sampling:
    """What to sample (calibrl.sampling_config states it). Nothing here comes from the model
    folder's generation_config.json."""
    def __init__(self, n, max_new_tokens, temperature=1.0, top_p=1.0, greedy=False, stop_ids=(),
                 suppress_ids=()):
        self.n, self.max_new_tokens = n, max_new_tokens      # G samples of at most T tokens
        self.temperature, self.top_p, self.greedy = temperature, top_p, greedy
        self.stop_ids = tuple(stop_ids)          # a response ends after the first of these
        self.suppress_ids = tuple(suppress_ids)  # never sampled: their scores are -inf


def process_logits(logits, sp, suppress):
    """logits (N, V) any dtype -> scores (N, V) fp32; the sampled distribution is softmax(scores).
    transformers' steps in its order (fp32 copy, suppression, temperature, top-p), so the same
    logits give bit-identical probabilities. suppress: (k,) long ids on the device, or None."""
    scores = logits.float()
    if suppress is not None:
        scores = scores.index_fill(1, suppress, float("-inf"))
    if sp.greedy:
        return scores
    if sp.temperature != 1.0:
        scores = scores / sp.temperature
    if sp.top_p < 1.0:  # nucleus: drop the least likely ids holding <= 1 - top_p, keep at least one
        sorted_scores, idx = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - sp.top_p
        remove[:, -1] = False
        scores = scores.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    return scores


def sample(logits, sp, suppress):
    """logits (N, V) -> token (N,) long, logp (N,) fp32: the token's log-prob under the sampler
    (greedy: argmax, its log-prob under softmax(scores / T), T the training temperature)."""
    scores = process_logits(logits, sp, suppress)
    if sp.greedy:
        tok = scores.argmax(-1)  # on unscaled scores: a division by T can create ties
        if sp.temperature != 1.0:
            scores = scores / sp.temperature
    else:  # softmax then multinomial, as transformers does: the same draws from the same RNG state
        tok = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    logp = scores.gather(1, tok[:, None]).squeeze(1) - scores.logsumexp(-1)
    return tok, logp
