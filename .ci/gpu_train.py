"""calibrl.main under torchrun with the CUDA memory capped, for the GPU check (.ci/gpu_check.sh):

    torchrun --standalone --nproc_per_node=1 .ci/gpu_train.py --preset paper --model DIR ...

GPU_MEM_GB (default 80) caps this process's CUDA allocator with set_per_process_memory_fraction, so
that a run on a larger GPU shows what fits on an 80 GB one. Without CUDA it runs uncapped."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
cap = float(os.environ.get("GPU_MEM_GB", "80")) * 2**30
if torch.cuda.is_available():
    local = int(os.environ.get("LOCAL_RANK", "0"))
    total = torch.cuda.get_device_properties(local).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device=local)
import calibrl  # noqa: E402

calibrl.main(sys.argv[1:])
if torch.cuda.is_available():
    print(f"rank {os.environ.get('RANK', 0)}: peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB "
          f"(cap {cap / 2**30:.0f} GiB of {total / 2**30:.0f})", flush=True)
