"""Answering many visitors at once: chats share the model as one running batch, each answered as if alone.

- requests.py: one visitor's request, its state on the worker thread, its result;
- scheduler.py: who joins the running batch at the next step (pure, tested without a model);
- batch.py: the step loop (prefills, overlapped steps, kept conversations);
- rows.py and static_rows.py: the rows of one cache, without a graph and on the fast path's graphs;
- this module: how a loaded model is served (together, or one at a time and why), and the answer of a model
  the batch cannot run (an encoder-decoder), through `model.generate()`.

The model worker (core.worker) owns all of it: requests are admitted, stepped and finished on its thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from core import families, fastpath, generation, loading
from core.errors import SpecError
from core.serving.batch import batchable
from core.serving.requests import ChatRequest, Finish, Piece

CPU_MAX_BATCH = 8  # measured on 2 cores with the embedded model: 8 chats at once already take the cores
GPU_MAX_BATCH = 16  # the rows the fast path's kernels serve (core.kernels); more rows wait their turn
MAX_PER_VISITOR = 2


@dataclass(frozen=True)
class Serving:
    """How chats on the loaded model are answered."""

    rows: int  # requests decoding together at most (1: one at a time)
    batched: bool  # False: the model is answered through model.generate(), one at a time
    note: str  # in words, for the page and the README's promise

    @staticmethod
    def limits_from_env(on_gpu: bool) -> tuple[int, int]:
        """APP_MAX_BATCH and APP_MAX_ACTIVE_PER_VISITOR, with their defaults."""
        return (_env_int("APP_MAX_BATCH", GPU_MAX_BATCH if on_gpu else CPU_MAX_BATCH),
                _env_int("APP_MAX_ACTIVE_PER_VISITOR", MAX_PER_VISITOR))


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise SystemExit(f"{name}={text!r}: use a whole number of at least 1")
    return int(text)


def serving_of(loaded: loading.LoadedModel, max_batch: int, context: int = 2560, held: int = 0) -> Serving:
    """How chats on `loaded` are served; `context` is the longest chat the app allows (input cap plus new tokens);
    `held`, the bytes the running batch's cache already holds on the GPU (it counts as free: it is what it is for)."""
    if loaded.family.is_encoder_decoder:
        return Serving(1, False, "Chats are answered one at a time: an encoder-decoder's decoder steps carry each "
                                 "input's own encoder output, which the running batch does not merge.")
    state = fastpath.state(loaded)
    if loaded.spec.quant.mode == "int8" and not state.kernels:
        return Serving(1, True, "Chats are answered one at a time: LLM.int8() picks its outlier columns over all "
                                "the rows it multiplies, so in a batch one visitor's prompt could change another's "
                                "answer. On a GPU, the fast path's W8A16 kernel has no such coupling and batches.")
    why = batchable(loaded.model)
    if why:
        return Serving(1, True, f"Chats are answered one at a time: {why}.")
    rows, room = rows_that_fit(loaded, max_batch, context, held)
    return Serving(rows, True, f"Chats are answered together, up to {rows} at a time{room}, each exactly as it "
                               "would be alone.")


def rows_that_fit(loaded: loading.LoadedModel, max_batch: int, context: int, held: int = 0) -> tuple[int, str]:
    """At most `max_batch` (APP_MAX_BATCH) rows, and on a GPU no more than the KV caches of full-length chats (the
    fit check's estimate, `context` tokens each) that fit in 80% of the memory left free after the model: free on the
    device, plus what PyTorch keeps cached but unused, plus `held` (the running batch's own cache)."""
    if loaded.input_device.type != "cuda":
        return max_batch, " (APP_MAX_BATCH)"
    import torch

    device = loaded.input_device
    free = (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device) + held)
    dtype = str(next(p.dtype for p in loaded.model.parameters() if p.dtype.is_floating_point)).removeprefix("torch.")
    per_row = families.kv_cache_bytes(loaded.model.config, context, 1, dtype)
    fit = max(1, int(free * 0.8) // max(per_row, 1))
    if fit >= max_batch:
        return max_batch, " (APP_MAX_BATCH)"
    return fit, (f" (the KV caches of {fit} chats of {context:,} tokens fit in the free GPU memory; APP_MAX_BATCH is "
                 f"{max_batch})")


def answer_alone(loaded: loading.LoadedModel, request: ChatRequest, emit, cancel) -> tuple:
    """An answer through `model.generate()`, for the models the batch does not run; (text, ids, finish, metrics)."""
    spec = request.spec
    if spec.constraint is not None or spec.logprobs is not None:
        raise SpecError("response_format" if spec.constraint is not None else "logprobs", "set",
                        "encoder-decoder models answer without constraints or log-probabilities here; leave it out")
    stop = generation.StopText(spec.stop)
    shown: list[str] = []

    def on_text(text: str) -> None:
        piece = stop.feed(text)
        if piece:
            shown.append(piece)
            emit(Piece(piece))

    result = generation.generate(loaded, [request.prompt], spec, on_text=on_text, cancel=cancel,
                                 max_input_tokens=request.max_input_tokens)
    if rest := stop.finish():
        shown.append(rest)
        emit(Piece(rest))
    finish = (Finish.CANCELLED if result.cancelled else Finish.STOP if stop.stopped
              or result.metrics.new_tokens < spec.max_new_tokens else Finish.LENGTH)
    return "".join(shown).strip(), result.token_ids[0], finish, result.metrics

