"""How far a fast path's next-token distributions are from the float32 reference, measured as
llama.cpp measures quantization (`llama-perplexity --kl-divergence`).

Both models read the same text in the same chunks, each chunk one forward over a growing cache
(`all_logits`), and every position's distribution is compared: mean and 99th-percentile KL
divergence D(reference || fast), how often their top tokens agree, and each one's perplexity. The
bar: a kvgen path is as good as llama.cpp when its mean KLD is no larger than llama.cpp's on the
same file and text (`../shared/ANCHORS.md` has llama.cpp's; `kvgen bench` measures it too).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from .cache import make_cache

CHUNK = 256  # positions per forward: its (CHUNK, vocab) float32 logits are what memory holds


@dataclass
class Quality:
    tokens: int  # positions scored: the text's length less the last
    mean_kld: float
    p99_kld: float
    top1_agreement: float  # fraction of positions whose argmax is the reference's
    reference_perplexity: float
    perplexity: float

    def as_dict(self) -> dict:
        return asdict(self)


def chunk_logits(model: nn.Module, ids: list[int], chunk: int = CHUNK):
    """Yield (T, vocab) float32 log-probabilities for the text's positions, `chunk` at a time, each
    chunk one forward that attends to everything before it through the cache."""
    device = next(model.parameters()).device
    cache = make_cache("dynamic", model.cache_layout(), 1, len(ids), next(model.parameters()).dtype, device)
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            tokens = torch.tensor([ids[start : start + chunk]], device=device)
            positions = torch.arange(start, start + tokens.shape[1], device=device)[None]
            yield model(tokens, positions, cache, all_logits=True)[0].float().log_softmax(-1)


def compare_logprobs(reference: Tensor, fast: Tensor) -> tuple[Tensor, Tensor]:
    """Per-position KL(reference || fast) and top-1 agreement, for (T, vocab) log-probabilities."""
    kld = (reference.exp() * (reference - fast)).sum(-1).clamp(min=0)
    return kld, reference.argmax(-1) == fast.argmax(-1)


def measure(reference: nn.Module, fast: nn.Module, ids: list[int], chunk: int = CHUNK) -> Quality:
    """Stream `ids` through both models and compare every position's next-token distribution."""
    return compare(chunk_logits(reference, ids, chunk), chunk_logits(fast, ids, chunk), ids)


def compare(reference: Iterable[Tensor], fast: Iterable[Tensor], ids: list[int]) -> Quality:
    """Compare two streams of (T, vocab) log-probability chunks over the positions of `ids`."""
    if len(ids) < 2:
        raise ValueError("the text needs at least 2 tokens")
    klds, agree, nll_ref, nll_fast = [], [], [], []
    targets = torch.tensor(ids[1:])
    begin = 0
    for ref, fst in zip(reference, fast):
        ref, fst = ref.cpu(), fst.cpu()
        n = min(len(ref), len(targets) - begin)  # the text's last position predicts nothing
        kld, same = compare_logprobs(ref[:n], fst[:n])
        klds.append(kld.double())
        agree.append(same)
        want = targets[begin : begin + n, None]
        nll_ref.append(-ref[:n].gather(1, want).double())
        nll_fast.append(-fst[:n].gather(1, want).double())
        begin += len(ref)
    kld = torch.cat(klds)
    return Quality(
        tokens=len(kld),
        mean_kld=float(kld.mean()),
        p99_kld=float(torch.quantile(kld, 0.99)),
        top1_agreement=float(torch.cat(agree).double().mean()),
        reference_perplexity=math.exp(float(torch.cat(nll_ref).mean())),
        perplexity=math.exp(float(torch.cat(nll_fast).mean())),
    )


def llama_cpp_logits(gguf: str | Path, ids: list[int], chunk: int = CHUNK, threads: int | None = None):
    """Yield llama.cpp's (T, vocab) float32 log-probabilities for the text's positions (through
    llama-cpp-python, on the GGUF's own quantized kernels), `chunk` positions per evaluation, as
    `chunk_logits` yields kvgen's: the same measurement for both engines."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf), n_ctx=len(ids) + 8, n_batch=chunk, n_ubatch=chunk, logits_all=True,
        n_threads=threads, n_threads_batch=threads, verbose=False,
    )  # fmt: skip
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk]
        llm.eval(piece)
        yield torch.from_numpy(np.array(llm.scores[start : start + len(piece)])).log_softmax(-1)
