"""Way 1: transformers' own `model.generate()`, behind the same token-step interface as our loop.

`generate()` runs in a worker thread and hands each step's tokens over through a streamer, so the
text layer above (streaming, stop strings, batching results, timings) is shared by both ways and
the comparison is of the loops alone.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import torch
from torch import Tensor

from .generate import check_fits, left_pad
from .sampling import SamplingParams


def load_hf(folder, dtype: torch.dtype, device: torch.device | str):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # kvgen prints its own timings
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def generate_tokens_hf(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams,
    eos_token_ids: list[int],
    pad_token_id: int,
    cache_kind: str = "dynamic",
) -> Iterator[Tensor]:
    """Yield (B,) token ids per step from `model.generate()`; closing the generator stops it."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    check_fits(max(map(len, prompts)), max_new_tokens, model.config.get_text_config().max_position_embeddings)
    tokens, positions = left_pad(prompts, pad_token_id)
    steps: queue.Queue = queue.Queue()
    cancelled = threading.Event()

    class Streamer(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value: Tensor) -> None:
            if self.prompt_seen:  # the first call hands over the prompt itself
                steps.put(value.reshape(-1).clone())
            self.prompt_seen = True

        def end(self) -> None:
            steps.put(None)

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
            return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

    sampling = dict(do_sample=False)
    if not params.greedy:
        sampling = dict(
            do_sample=True,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p or None,
        )
    kwargs = dict(
        input_ids=tokens.to(model.device),
        attention_mask=(positions >= 0).long().to(model.device),
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        repetition_penalty=params.repetition_penalty,
        eos_token_id=eos_token_ids,  # [] generates through EOS
        pad_token_id=pad_token_id,
        streamer=Streamer(),
        stopping_criteria=StoppingCriteriaList([Cancelled()]),
        cache_implementation="static" if cache_kind == "static" else None,
        **sampling,
    )

    def run() -> None:
        try:
            if params.seed is not None:
                torch.manual_seed(params.seed)  # transformers samples from the global generator
            model.generate(**kwargs)
        except BaseException as e:  # handed to the consumer, raised there
            steps.put(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        while (step := steps.get()) is not None:
            if isinstance(step, BaseException):
                raise step
            yield step
    finally:
        cancelled.set()
        worker.join()
