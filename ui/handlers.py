"""How a module-level function becomes a Gradio handler.

Gradio reads a handler's signature twice: to inject `gr.Request`, `gr.OAuthProfile`, event data and `gr.Progress`
by their annotations, and to name the API parameters (`client.predict(quant="nf4", api_name="/load_model")`).
`handler(ctx, fn)` binds the app context as `fn`'s first argument and keeps the rest of its signature, so tab
modules keep their handlers at module level instead of nesting them in `build`. `with_load_form` gives a handler
the load form's fields (core.load_form) as its first named parameters, in the table's order, and hands them to
the function as one mapping.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from core import load_form
from server.context import AppContext
from ui.errors import user_errors


def _with_signature(fn: Callable, call: Callable, signature: inspect.Signature) -> Callable:
    functools.update_wrapper(call, fn)
    call.__signature__ = signature  # what inspect.signature (so Gradio) reads, before __wrapped__
    return call


def handler(ctx: AppContext, fn: Callable, *bound: object) -> Callable:
    """`fn(ctx, *bound, ...)` as a handler: `ctx` and `bound` given, the rest of the signature kept (Gradio injects
    and names by it), errors made one readable message."""
    signature = inspect.signature(fn)
    rest = signature.replace(parameters=list(signature.parameters.values())[1 + len(bound):])
    if inspect.isgeneratorfunction(fn):
        def stream(*args, **kwargs):
            yield from fn(ctx, *bound, *args, **kwargs)
        return user_errors(ctx)(_with_signature(fn, stream, rest))

    def call(*args, **kwargs):
        return fn(ctx, *bound, *args, **kwargs)
    return user_errors(ctx)(_with_signature(fn, call, rest))


def with_load_form(fn: Callable) -> Callable:
    """`fn(ctx, form, *rest)` -> `fn(ctx, model="", revision="", ..., fast_path_compile=False, *rest)`: the form's
    fields as named parameters with their defaults, collected into `form` (a dict by field name)."""
    signature = inspect.signature(fn)
    ctx_param, _, *rest = signature.parameters.values()
    fields = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default, annotation=f.kind)
              for f in load_form.FIELDS]
    expanded = signature.replace(parameters=[ctx_param, *fields, *rest])

    def call(*args, **kwargs):
        bound = expanded.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        form = {name: arguments.pop(name) for name in load_form.NAMES}
        return fn(arguments.pop(ctx_param.name), form, **arguments)

    wrapped = _with_signature(fn, call, expanded)
    wrapped.__annotations__ = {**fn.__annotations__, **{f.name: f.kind for f in load_form.FIELDS}}
    return wrapped
