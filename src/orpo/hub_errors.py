"""The Hugging Face Hub's failures as one line each: which repo, what went wrong, and what to do.

huggingface_hub raises its own errors (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError, an HTTP
error with its status, OfflineModeIsEnabled, LocalEntryNotFoundError, the HTTP client's connection errors), and
the libraries that download for orpo wrap them: transformers in an OSError raised from the original, datasets in
a ConnectionError or DatasetNotFoundError of its own that often keeps only a message (it re-raises `from None`
once its cache has nothing either). `hub_errors(repo)` looks through the whole chain (`__cause__` and
`__context__`) and those messages, and turns what it recognizes into a HubError whose message is the one line the
command line prints (exit 1); anything else passes through unchanged.

Used around every download (model/load.py: tokenizer and model; after/runs.py: a fully trained model;
data/hub.py: datasets) and the upload (after/push.py). Used by every stage, so it imports nothing of orpo, and
huggingface_hub only when an error is being explained (the command line imports this module for `--help`).
"""

from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Literal

LOGIN = "log in with `hf auth login` (or set HF_TOKEN)"
# Connection failures of the HTTP clients huggingface_hub has used (httpx, requests) and their transports, by
# class name: importing them here would load the client for `orpo --help`, and which one is installed varies.
CLIENTS = ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")
TRANSPORT = ("TransportError", "ConnectError", "ConnectTimeout", "TimeoutException", "ProxyError", "NetworkError",
             "ConnectionError", "Timeout", "SSLError", "NewConnectionError", "MaxRetryError")


class HubError(RuntimeError):
    """A download from or an upload to the Hub that failed, as one line naming the repo and what to do."""


@contextmanager
def hub_errors(repo: str, kind: Literal["model", "dataset"] = "model", revision: str | None = None, upload: bool = False):
    """Run the block; a Hub failure inside it becomes HubError (see `explain`), anything else is re-raised as is."""
    try:
        yield
    except HubError:
        raise
    except Exception as exc:
        line = explain(exc, repo, kind, revision, upload)
        if line is None:
            raise
        raise HubError(line) from exc


def chain(exc: BaseException) -> list[BaseException]:
    """`exc` and every exception it was raised from or while handling, each once, outermost first."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        error = todo.pop(0)
        if error is None or any(error is s for s in seen):
            continue
        seen.append(error)
        todo += [error.__cause__, error.__context__]
    return seen


def status(error: BaseException) -> int | None:
    """The HTTP status of a huggingface_hub HTTP error; None for any other error."""
    return getattr(getattr(error, "response", None), "status_code", None)


def is_transport(error: BaseException) -> bool:
    """A connection that could not be made or was cut: DNS, refused, timed out, proxy, TLS."""
    if isinstance(error, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    return any(c.__module__.split(".")[0] in CLIENTS and c.__name__ in TRANSPORT for c in type(error).__mro__)


def flat(text: object, limit: int = 160) -> str:
    """One line, at most `limit` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def explain(exc: BaseException, repo: str, kind: str = "model", revision: str | None = None, upload: bool = False) -> str | None:
    """The line for a Hub failure anywhere in `exc`'s chain; None when it is not one."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hub

    errors = chain(exc)
    text = " ".join(str(e) for e in errors)  # what datasets keeps of the original error

    def first(cls):
        return next((e for e in errors if isinstance(e, cls)), None)

    page = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo}"
    name = f"{kind} {repo}"
    http = [e for e in errors if status(e) is not None]
    code = status(http[0]) if http else None
    if first(hub.GatedRepoError) or "is a gated dataset" in text:
        return f"{name} is gated: accept its license at {page}, then {LOGIN} as the account that accepted it"
    if first(hub.RevisionNotFoundError) or ("Revision '" in text and "doesn't exist" in text):
        return f"{name} has no revision '{revision or 'main'}': check model.revision (a branch, tag or commit listed at {page})"
    if code == 401 and not first(hub.RepositoryNotFoundError):
        return f"the Hub refused your token (401 Unauthorized) for {name}: log in again with `hf auth login`, or check HF_TOKEN"
    if first(hub.RepositoryNotFoundError) or "doesn't exist on the Hub" in text:
        where = "check the name (owner/name, where owner is you or an organization you may write to)" if upload else "check the name"
        return f"{name} was not found on the Hugging Face Hub: {where}; a private repo also needs you to {LOGIN}"
    if first(hub.HFValidationError):
        return f"{repo} is not a valid Hub repo id ({flat(first(hub.HFValidationError), 100)}): check the name"
    if first(hub.DisabledRepoError):
        return f"{name} is disabled on the Hub by its owner: use another repo"
    offline = (first(hub.OfflineModeIsEnabled) or "(OfflineModeIsEnabled)" in text
               or (first(hub.LocalEntryNotFoundError) and not any(map(is_transport, errors)) and constants.HF_HUB_OFFLINE))
    if offline and upload:
        return f"HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it to push to {name}"
    if offline:
        return (f"{name} is not in the Hugging Face cache and offline mode (HF_HUB_OFFLINE=1) forbids downloading it: "
                "unset HF_HUB_OFFLINE to download it once, or give a local path")
    transport = [e for e in errors if is_transport(e)]
    if transport or (first(hub.LocalEntryNotFoundError) and code is None):
        client = [e for e in transport if type(e) is not ConnectionError and str(e)]  # not datasets' own, which only says so
        reason = f" ({type(client[-1]).__name__}: {flat(client[-1], 100)})" if client else ""
        if upload:
            return f"cannot reach the Hugging Face Hub to upload to {name}{reason}: check the network connection or proxy (HTTPS_PROXY)"
        return (f"cannot reach the Hugging Face Hub to download {name}{reason}: check the network connection or proxy "
                "(HTTPS_PROXY); if it is in the cache already, set HF_HUB_OFFLINE=1 to use the cache")
    if code is None:
        return None
    said = flat(getattr(http[0], "server_message", None) or "", 120)
    said = f": {said}" if said else ""
    if code == 403 and upload:
        return (f"your token may not write to {name} (403 Forbidden{said}): {LOGIN} using a token with write access, "
                "to your own namespace or an organization's you may write to")
    if code == 403:
        return f"your token may not read {name} (403 Forbidden{said}): {LOGIN} using a token with read access to it"
    if code == 429:
        return f"the Hub limits your requests (429 Too Many Requests) for {name}: wait a few minutes; logged-in users get more ({LOGIN})"
    return f"the Hub answered {code} for {name}{said}: try again later (https://status.huggingface.co)"
