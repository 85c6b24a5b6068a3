"""What an answer may be: JSON-schema constraints on decoding, over llguidance.

A `JsonConstraint` is built from a schema at the boundary (`from_response_format`, `json_answer`, or core.tools for
a forced tool call): the schema is compiled into llguidance's grammar there, without a tokenizer, so a schema the
library cannot enforce is refused before the request joins the queue, with llguidance's own words for the construct
("Unimplemented keys: [\"not\"]"). On the worker thread, the running batch asks it for a `GrammarMatcher` against
the tokenizer of whichever model answers (core.serving.requests calls `matcher(tokenizer)`): the matcher masks
every token the grammar forbids next, so the answer always parses and follows the schema, whatever the model or its
quantization, and allows the end token only once the grammar accepts (and ends the answer itself once the grammar
allows nothing more). An answer cut by max_tokens is the one exception: it ends with finish_reason "length".

Why llguidance (measured on this machine's 2 shared CPU cores with the embedded SmolLM2-135M, see the README's
"Structured output" section): it refuses the JSON-Schema keywords it cannot enforce (xgrammar 0.2.8 compiled
`not`, `uniqueItems` and `if`/`then` and then accepted answers that break them); it compiles a schema in 1 to 30 ms
with no tokenizer (outlines-core 0.2.14 took 5 to 20 s per schema and has no recursion); its mask costs about
0.3 ms a token. The tokenizer's index costs 1 to 6 s once per tokenizer and is cached (`tokenizer_index`).
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch

from core.errors import SpecError

log = logging.getLogger(__name__)

# Python's json.dumps spacing, the shape small models saw most in training; no free whitespace, so a small model
# cannot spend its answer on blank lines.
_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SCHEMA_CHARS = 32_000


@dataclass(frozen=True)
class JsonConstraint:
    """A JSON schema compiled into llguidance's grammar (tokenizer-independent): a core.serving Constraint."""

    schema: str  # the schema as given, as JSON text (what the answer follows)
    grammar: str  # llguidance's grammar for it

    def matcher(self, tokenizer) -> GrammarMatcher:
        return GrammarMatcher(self.grammar, tokenizer_index(tokenizer))


def compile_schema(schema: Any, field: str) -> JsonConstraint:
    """The constraint for `schema` (a JSON-Schema object); SpecError naming `field` and the construct llguidance
    cannot enforce."""
    if not isinstance(schema, dict):
        raise SpecError(field, short(schema), "a JSON schema is a JSON object, like {\"type\": \"object\", "
                                               "\"properties\": {...}}")
    text = json.dumps(schema, ensure_ascii=False)
    if len(text) > MAX_SCHEMA_CHARS:
        raise SpecError(field, short(text), f"the schema is {len(text):,} characters; at most {MAX_SCHEMA_CHARS:,}")
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_FORMAT)
    problem = llguidance.LLMatcher.validate_grammar(grammar, None)
    if problem:
        raise SpecError(field, short(text), f"the answer could not be held to this schema ({problem.strip()}). "
                                             "Leave out or rewrite that part of the schema")
    return JsonConstraint(schema=text, grammar=grammar)


ANY_OBJECT = {"type": "object"}


def from_response_format(value: Any) -> JsonConstraint | None:
    """OpenAI's `response_format`: {"type": "text"}, {"type": "json_object"}, or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}. `strict` is accepted either way: the answer always follows the
    schema, and a schema that cannot be enforced is refused (OpenAI's strict mode; vLLM does the same)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return compile_schema(ANY_OBJECT, "response_format")
    if kind != "json_schema":
        raise SpecError("response_format", short(value),
                        "use {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": \"json_schema\", "
                        "\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise SpecError("response_format.json_schema", short(spec), "give {\"name\": ..., \"schema\": {...}, "
                                                                     "\"strict\": true}")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise SpecError("response_format.json_schema.strict", short(spec.get("strict")), "use true or false")
    return compile_schema(spec["schema"], "response_format.json_schema.schema")


def json_answer(on: bool, schema_text: str | None) -> JsonConstraint | None:
    """The page's "Answer as JSON": any JSON object, or one that follows the schema typed beside it."""
    if not on:
        return None
    text = (schema_text or "").strip()
    if not text:
        return compile_schema(ANY_OBJECT, "json_schema")
    try:
        schema = json.loads(text)
    except ValueError as error:
        raise SpecError("json_schema", short(text), f"it is not valid JSON ({error}); leave it empty for any JSON "
                                                     "object") from None
    return compile_schema(schema, "json_schema")


def short(value: Any, limit: int = 80) -> str:
    """A request's value as an error quotes it: JSON text, cut to `limit` characters."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------- on the worker thread

_indexes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_indexes_lock = threading.Lock()


def tokenizer_index(tokenizer) -> llguidance.LLTokenizer:
    """llguidance's index of a Hugging Face tokenizer (every token's bytes, and the slices that make masks cheap):
    built once per tokenizer, so that a constrained request only compiles its grammar against it."""
    with _indexes_lock:
        index = _indexes.get(tokenizer)
        if index is None:
            try:
                index = llguidance.hf.from_tokenizer(tokenizer)
            except ValueError as error:  # a slow (Python) tokenizer: llguidance reads the Rust one
                raise SpecError("response_format", type(tokenizer).__name__,
                                f"this model's tokenizer cannot be constrained ({error})") from None
            _indexes[tokenizer] = index
        return index


class GrammarMatcher:
    """One answer's place in the grammar: masks a row of scores, takes the chosen token, says when it is complete."""

    def __init__(self, grammar: str, index: llguidance.LLTokenizer) -> None:
        self._matcher = llguidance.LLMatcher(index, grammar, log_level=0)
        self._vocab = index.vocab_size
        self._eos = index.eos_token
        self._words = np.zeros((self._vocab + 31) // 32, dtype=np.int32)
        self._failed = False
        self._check()

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` ([vocab], not changed) with every token the grammar forbids now at -inf. The model's rows may be
        longer than the tokenizer's vocabulary (padded embeddings): those ids are never allowed."""
        if self._failed:
            allowed = np.zeros(self._vocab, dtype=np.bool_)
            allowed[self._eos] = True
        else:
            self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
            allowed = np.unpackbits(self._words.view(np.uint8), bitorder="little")[:self._vocab].view(np.bool_)
        keep = torch.zeros(scores.shape[-1], dtype=torch.bool)
        n = min(self._vocab, scores.shape[-1])
        keep[:n] = torch.from_numpy(allowed[:n])
        return scores.masked_fill(~keep.to(scores.device, non_blocking=True), float("-inf"))

    def accept(self, token_id: int) -> None:
        if not self._failed:
            self._matcher.consume_token(token_id)
            self._check()

    def is_terminated(self) -> bool:
        """The grammar allows nothing more (or the matcher failed): the answer ends here."""
        return self._failed or self._matcher.is_stopped()

    def _check(self) -> None:
        """A matcher in error (which masking prevents) ends its answer rather than the whole running batch."""
        if self._matcher.is_error():
            self._failed = True
            log.error("constrained decoding stopped: %s", self._matcher.get_error())
