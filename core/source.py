"""Where a model comes from (the embedded default, a local folder or the Hub), and its config.

Hub and file-system failures are turned into `ModelNotFoundError` or `HubUnreachableError` here,
so that every caller gets the same message for the same problem.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from huggingface_hub import errors as hub_errors

from core import default_model
from core.errors import HubUnreachableError, ModelNotFoundError, SpecError
from core.spec import LoadSpec

Progress = Callable[[float, str], None]


def resolve(spec: LoadSpec, progress: Progress | None = None) -> str:
    """The path or Hub id that from_pretrained should read for this spec."""
    if spec.is_embedded:
        return str(default_model.ensure_checkpoint(progress))
    return spec.model


@contextmanager
def hub_errors_explained(spec: LoadSpec) -> Iterator[None]:
    """Turns download failures into one clear message each."""
    try:
        yield
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError) as error:
        raise ModelNotFoundError(_not_found(spec)) from error
    except hub_errors.RevisionNotFoundError as error:
        raise ModelNotFoundError(_no_revision(spec)) from error
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled) as error:
        raise HubUnreachableError(_unreachable(spec)) from error
    except OSError as error:
        text = str(error)
        if "is not a valid git identifier" in text:
            raise ModelNotFoundError(_no_revision(spec)) from error
        if "not a valid JSON" in text:
            raise SpecError("model", _shown(spec), "its config.json is not valid JSON; fix or replace the file") from error
        if "couldn't connect" in text or "offline" in text.lower() or "Connection" in text:
            raise HubUnreachableError(_unreachable(spec)) from error
        if "not a valid model identifier" in text or "does not appear to have a file" in text \
                or "Repository Not Found" in text or "is not a local folder" in text:
            raise ModelNotFoundError(_not_found(spec)) from error
        raise


def _no_revision(spec: LoadSpec) -> str:
    return (f"{spec.model} has no revision {spec.revision!r}; use a branch, tag or commit that exists, or leave "
            "revision empty for 'main'.")


def _not_found(spec: LoadSpec) -> str:
    return (f"Model {spec.model!r} was found neither as a local folder nor on the Hub. Check the spelling "
            "(ids look like 'HuggingFaceTB/SmolLM2-360M-Instruct'); for a private or gated model, sign in "
            "or set HF_TOKEN.")


def _unreachable(spec: LoadSpec) -> str:
    return (f"Could not reach the Hugging Face Hub to fetch {spec.model!r}, and it is not in the local cache. "
            "Check the network (or HF_ENDPOINT), or leave the model empty to use the embedded "
            "SmolLM2-135M-Instruct.")


def hub_token(spec: LoadSpec) -> bool | None:
    """What from_pretrained gets as `token`: None (the server's HF_TOKEN or login) or False (anonymous)."""
    return None if spec.use_server_token else False


def load_config(spec: LoadSpec, progress: Progress | None = None):
    """The model's `PretrainedConfig`, read without loading weights. Imports no code unless trust_remote_code."""
    from transformers import AutoConfig

    path = resolve(spec, progress)
    with hub_errors_explained(spec):
        try:
            return AutoConfig.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                                              token=hub_token(spec))
        except ValueError as error:
            first = (str(error).strip().splitlines() or [""])[0][:200]
            if "trust_remote_code" in str(error):
                raise SpecError("model", _shown(spec), "it needs code from its own repository, which this app runs "
                                                       "only when started with --trust-remote-code") from error
            raise SpecError("model", _shown(spec), f"transformers cannot read its config.json ({first})") from error


def _shown(spec: LoadSpec) -> str:
    return spec.model.split(":", 1)[-1] if spec.is_embedded else spec.model
