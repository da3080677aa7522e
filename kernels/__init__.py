"""Fused Triton kernels for CalibRL: the LM head + log-softmax + loss without materialised logits.
Without CUDA the kernels run in Triton's numpy interpreter (tests, the CPU demo): TRITON_INTERPRET
must be set before the kernels are decorated, i.e. before the import below."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .fused_calibrl import fused_logprobs, fused_policy_loss  # noqa: E402

__all__ = ["fused_logprobs", "fused_policy_loss"]
