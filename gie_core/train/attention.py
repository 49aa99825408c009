"""Which scaled-dot-product-attention kernels the training step runs (``train.attention_kernels``).

Why this is explicit. PyTorch picks an SDPA kernel per call. Since 2.10, with cuDNN newer than
9.15, it prefers cuDNN's fused attention on sm90/sm100 (H100, H200, B200). The stage-2 LoRA step
of ``training/24gb_stage2.yaml`` then died on an H200 (torch 2.11, CUDA 13) with ``CUDA error: an
illegal memory access`` in cuDNN's attention graph (``mha_graph.execute(...).is_good()``), with and
without gradient checkpointing, with fp8 and with bf16 storage. Inference at the same width ran.
A plain SDPA forward and backward at 8,704 tokens also ran.

What differs in training is the backward pass and the sequence length. The trainer's joint
sequence is the Qwen tokens of each pair (their number follows the instruction and the image)
plus 2 x 4,096 image tokens, so it is almost never a multiple of 128. The benchmark's 8,704 is.
cuDNN's SDPA backward has open defects at such lengths on Hopper: NaN ``grad_q`` at lengths
``% 128 == 64`` with a mask (pytorch#196678, a regression in 2.11). PyTorch itself requires
cuDNN 9.15.1 for its "seq_len not divisible by 128" fix before it prefers cuDNN at all
(pytorch#169849). Others report intermittent ``mha_graph.execute`` failures (pytorch#134001,
#122695, #190321), and NVIDIA's NeMo AutoModel keeps cuDNN out of activation-checkpointed steps.
This is the likely cause, not yet confirmed on a GPU: the GPU test runs the step at such a
length. diffusers hands SDPA ``[B, H, S, D]`` views of ``[B, S, H, D]`` projections, in inference
as in training. Copying them to contiguous tensors would change the memory layout, but cuDNN
would still run the backward at the same length. So this module changes the kernel instead.

The fix is at the kernel choice: the step, forward *and* backward, runs under
:func:`torch.nn.attention.sdpa_kernel` limited to ``train.attention_kernels``. The default is
flash, memory-efficient and math, so PyTorch still picks the fastest of those for each call. The
backward matters: gradient checkpointing recomputes attention inside ``backward()``, and the
kernel a recomputed forward picks also sets the backward kernel. A user who wants cuDNN adds
``cudnn`` to the list. The GPU test and ``bench/gpu_check.py`` run the step at the crash layout.

Sampling (validation edits, gie-edit, the nodes) keeps PyTorch's own choice, cuDNN included on
Hopper. It is forward-only, it ran on the H200 at 1 MP, and the forward kernel is not the one
with the defects. ``bench/gpu_check.py`` records which kernel sampling selects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch.nn.attention import SDPBackend, sdpa_kernel

from gie_core.train.config import ATTENTION_KERNEL_TABLE

__all__ = ["allowed_kernels", "training_attention"]


def sdpa_backends(names: Sequence[str]) -> list[SDPBackend]:
    """The SDPBackend members of ``train.attention_kernels`` names (checked by ``TrainConfig.check``)."""
    return [getattr(SDPBackend, ATTENTION_KERNEL_TABLE[name].backend) for name in names]


@contextlib.contextmanager
def training_attention(names: Sequence[str]) -> Iterator[None]:
    """Run a block (a training step's forward and backward) with SDPA limited to the kernels
    ``names`` (``train.attention_kernels``); PyTorch picks among them per call."""
    with sdpa_kernel(sdpa_backends(names)):
        yield


def allowed_kernels() -> list[str]:
    """The names of the SDPA kernels allowed where this is called (for logs and tests)."""
    from torch.nn.attention import _cur_sdpa_kernel_backends  # private: torch has no public reader of the context

    by_backend = {k.backend: k.name for k in ATTENTION_KERNEL_TABLE.values()}
    return [by_backend[b.name] for b in _cur_sdpa_kernel_backends() if b.name in by_backend]
