"""What differs between causal and encoder-decoder models, in one place.

A model's kind is decided from its config alone, before any weight is read (`of`): a causal LM
loads with `AutoModelForCausalLM` (Llama, Qwen, SmolLM, ...), an encoder-decoder text-to-text
model with `AutoModelForSeq2SeqLM` (T5, Flan-T5, mT5, BART, ...). Anything else is refused with a
message that names the kind found and the kinds supported. Everything else that depends on the
kind reads the `Family` returned, or the shape helpers below:

- the KV cache: a causal model keeps keys and values for every position of prompt and answer; an
  encoder-decoder keeps self-attention keys and values per generated token plus cross-attention
  keys and values over the input, in each decoder layer. Both cost the same per position, so
  "context" means prompt (input) plus answer for both kinds, and one formula holds (`kv_cache_bytes`);
- the largest transient of a forward pass (`activation_bytes`);
- what the fast path's CUDA graph can drive, and how (`fast_path_support`).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import SpecError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Family:
    name: str  # "causal" or "encoder-decoder"
    label: str  # for reports and cards
    auto_class: str  # the transformers Auto class that loads it
    pipeline_tag: str  # the Hub's task for its model card
    padding_side: str  # where a batch of prompts is padded
    examples: str

    @property
    def is_encoder_decoder(self) -> bool:
        return self.name == "encoder-decoder"

    def auto_model(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def prompt_positions(self, prompt_length: int) -> int:
        """Leading positions of generate()'s output that are not new tokens: the prompt, for a causal model; for an
        encoder-decoder, whose output is the decoder's sequence only, its one start token."""
        return 1 if self.is_encoder_decoder else prompt_length

    def input_room(self, window: int, max_new_tokens: int) -> tuple[int, str]:
        """The longest input a context window leaves, and why: a causal model's window holds the prompt and the answer;
        an encoder-decoder's encoder reads the input alone (its decoder has the same window for the answer)."""
        if self.is_encoder_decoder:
            return window, f"the model's input window of {window} tokens"
        return window - max_new_tokens, f"the model's context of {window} tokens minus {max_new_tokens} new tokens"


CAUSAL = Family(name="causal", label="causal LM", auto_class="AutoModelForCausalLM", pipeline_tag="text-generation",
                padding_side="left",  # new tokens of a batch line up on the right
                examples="Llama, Qwen, Mistral, SmolLM and the like")
ENCODER_DECODER = Family(name="encoder-decoder", label="encoder-decoder (text-to-text)",
                         auto_class="AutoModelForSeq2SeqLM", pipeline_tag="text2text-generation",
                         padding_side="right",  # the encoder reads the whole input; the decoder starts fresh
                         examples="T5, Flan-T5, mT5, BART and the like")

# Heads of other tasks, as `architectures` names them, in the words the refusal uses (first match wins).
_OTHER_TASKS = (
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "a masked language model, encoder-only"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "a sequence classifier"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "a token classifier"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "an extractive question-answering model"),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "a speech-to-text encoder-decoder"),
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "an image-and-text-to-text model"),
    ("MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES", "a text encoder"),
    ("MODEL_FOR_PRETRAINING_MAPPING_NAMES", "a pre-training model"),
    ("MODEL_MAPPING_NAMES", "a base model without a language-model head"),
)


def _class_names(mapping: dict) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (tuple, list)) else (value,))
    return names


def of(config) -> Family:
    """The family of the model `config` describes; `SpecError` naming the kind found for any other model.

    The config's `model_type` and `is_encoder_decoder` pick the candidate through transformers' Auto mappings (a
    remote-code model through the Auto classes its `auto_map` names). `architectures`, which every saved checkpoint
    lists, then says which head the weights have: a head of another task (BertForMaskedLM, a classifier) is
    refused, and names transformers does not know (T5WithLMHeadModel, on the original T5 checkpoints) defer to the
    config. Without `architectures`, a model type that is mainly a masked LM (BERT, RoBERTa, ...: transformers maps
    them to a causal LM only for their rarely used decoder mode) is refused as encoder-only.
    """
    from transformers.models.auto import modeling_auto as auto

    model_type = getattr(config, "model_type", "") or ""
    names = list(getattr(config, "architectures", None) or [])
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    auto_map = getattr(config, "auto_map", None) or {}
    if ENCODER_DECODER.auto_class in auto_map and encoder_decoder:
        return ENCODER_DECODER
    if CAUSAL.auto_class in auto_map:
        return CAUSAL
    candidate = None
    if encoder_decoder and model_type in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        candidate = ENCODER_DECODER
    elif not encoder_decoder and model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        candidate = CAUSAL
    language_heads = _class_names(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | _class_names(
        auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
    other = None if any(n in language_heads for n in names) else _other_task(names, auto)
    if candidate is CAUSAL and not names and model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        other = f"an encoder-only model ({model_type})"
    if candidate is not None and other is None:
        return candidate
    found = other or _unknown(model_type, encoder_decoder, names)
    raise SpecError("model", _shown(config),
                    f"it is {found}; this app loads causal language models ({CAUSAL.auto_class}: {CAUSAL.examples}) "
                    f"and encoder-decoder text-to-text models ({ENCODER_DECODER.auto_class}: "
                    f"{ENCODER_DECODER.examples}). Pick a model of one of those kinds")


def _other_task(names: list[str], auto) -> str | None:
    for attribute, words in _OTHER_TASKS:
        known = _class_names(getattr(auto, attribute, {}))
        for name in names:
            if name in known:
                return f"{words} ({name})"
    return None


def _unknown(model_type: str, encoder_decoder: bool, names: list[str]) -> str:
    what = "an encoder-decoder model" if encoder_decoder else "a model"
    listed = f" ({', '.join(names)})" if names else ""
    return f"{what} of type {model_type or 'unknown'!r}{listed} that neither Auto class can load"


def _shown(config) -> str:
    name = str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or "this model")
    return name if len(name) <= 80 else "..." + name[-77:]


# ----------------------------------------------------------------------------- shapes from the config


@dataclass(frozen=True)
class DecoderAttention:
    """The attention that keeps a KV cache: the decoder's layers (all layers of a causal model)."""

    layers: int
    kv_heads: int
    head_dim: int

    def bytes_per_position(self, dtype: str) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * DTYPE_BYTES[dtype]  # keys and values


def decoder_attention(config) -> DecoderAttention:
    text = config.get_text_config(decoder=True)
    # T5 names its decoder depth apart (num_decoder_layers); its decoder view of the config keeps the encoder's.
    layers = getattr(config, "num_decoder_layers", None) or text.num_hidden_layers
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return DecoderAttention(layers=layers, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                            head_dim=head_dim)


def kv_cache_bytes(config, context: int, batch: int, dtype: str) -> int:
    """The KV cache generate() holds for `context` positions: a causal model's prompt and answer; an
    encoder-decoder's input (cross-attention) and answer (self-attention), each layer the same bytes per position."""
    return decoder_attention(config).bytes_per_position(dtype) * context * batch


def _intermediate(config) -> int:
    for name in ("intermediate_size", "d_ff", "encoder_ffn_dim", "ffn_dim"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 4 * config.hidden_size


def activation_bytes(config, context: int, batch: int, dtype: str) -> int:
    """The largest transient of one forward pass over `context` tokens, and the last position's logits.

    For an encoder-decoder the context is taken as all input, the worst case: the encoder's pass over it is the
    largest transient, its output stays for the whole answer (cross-attention reads it), and a T5-style relative
    position bias is one (batch, heads, input, input) tensor, then another once the mask is added.
    """
    width = DTYPE_BYTES[dtype]
    mlp = 3 * context * batch * _intermediate(config) * width  # gate, up, and their product
    residual = 4 * context * batch * config.hidden_size * width
    logits = batch * config.vocab_size * 4 * 2  # fp32 last-position logits and their softmax
    total = mlp + residual + logits
    if of(config).is_encoder_decoder:
        total += context * batch * config.hidden_size * width  # the encoder's output
        if getattr(config, "relative_attention_num_buckets", None):
            total += 2 * batch * config.num_attention_heads * context * context * width
    return total


# ----------------------------------------------------------------------------- fast path


@dataclass(frozen=True)
class FastPathSupport:
    """Whether core's graphed decode step (core/cuda_graphs.py) can drive this model, and why not when it cannot."""

    cuda_graph: bool
    reason: str


def fast_path_support(model) -> FastPathSupport:
    """What the GPU fast path may do for `model` (a loaded model). On the CPU the fast path keeps the canonical
    settings for every model, so this matters on a GPU only. `reason` is "" for a causal LM (nothing to add)."""
    from core.cuda_graphs import KEPT_INPUT_LENGTHS

    family = of(model.config)
    if not family.is_encoder_decoder:
        return FastPathSupport(cuda_graph=True, reason="")
    if not getattr(type(model), "_can_compile_fullgraph", False):
        return FastPathSupport(cuda_graph=False, reason=(
            f"Encoder-decoder model: transformers does not mark {type(model).__name__} as compilable with a static "
            "cache, and the graphed decode step needs one, so decode runs as loaded."))
    return FastPathSupport(cuda_graph=True, reason=(
        "Encoder-decoder model: its decoder step is captured with the encoder's output and an EncoderDecoderCache "
        "(a static self-attention cache, and a cross-attention cache sized to the input exactly, since attention over "
        "padding would change the sums); so one graph holds one input length, the caches and graphs of the last "
        f"{KEPT_INPUT_LENGTHS} input lengths are kept, and the first answer to an input of a new length pays one "
        "capture."))
