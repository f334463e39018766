"""The Hub's failures are one line each, exit 1, in every command that reads or writes the Hub.

Offline: huggingface_hub's own HTTP client is given a fake Hub (a mock transport behind huggingface_hub's client
factory, with huggingface_hub's own request hook, so offline mode blocks it as it blocks the real one). The fake
Hub answers as the real one does (status and X-Error-Code headers), so huggingface_hub raises its own errors
(GatedRepoError, RepositoryNotFoundError, ...) and transformers and datasets wrap them their own way, as they
would with the network: what orpo sees is what a user would get. transformers and datasets are imported here, not
first inside a test: their log handlers bind to the stderr of the moment, which capsys closes after its test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets.config
import pytest
from huggingface_hub import constants
from transformers import AutoTokenizer

from conftest import tiny_overrides
from orpo.cli import main
from orpo.config import load_config, save_config
from orpo.hub_errors import HubError, chain, explain, hub_errors

MODEL = "orpo-tests/gated-model"  # never in any cache: every read goes to the (fake) Hub
DATA = "orpo-tests/pairs"
LOGIN = "log in with `hf auth login` (or set HF_TOKEN)"
# What the fake Hub answers for each case: the status and headers the real Hub sends.
ANSWERS = {
    "gated": (403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model is restricted and you are not in the authorized list."}),
    "not found": (401, {"X-Error-Code": "RepoNotFound"}),  # 401, not 404, when the request carries no valid token
    "revision": (404, {"X-Error-Code": "RevisionNotFound"}),
    "token": (401, {"X-Error-Message": "Invalid credentials in Authorization header"}),
    "forbidden": (403, {"X-Error-Message": 'You don\'t have the rights to create a model under the namespace "someone"'}),
}
CASES = ("gated", "not found", "revision", "token", "offline", "connection")


def expected(case: str, kind: str, repo: str) -> str:
    """The line `orpo` prints for a download of `repo` (a model or dataset) that fails with `case`."""
    name, page = f"{kind} {repo}", f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo}"
    reason = " (ConnectError: [Errno -2] Name or service not known)" if kind == "model" else ""  # datasets drops it
    return "orpo: error: " + {
        "gated": f"{name} is gated: accept its license at {page}, then {LOGIN} as the account that accepted it",
        "not found": f"{name} was not found on the Hugging Face Hub: check the name; a private repo also needs you to {LOGIN}",
        "revision": f"{name} has no revision 'v9': check model.revision (a branch, tag or commit listed at {page})",
        "token": f"the Hub refused your token (401 Unauthorized) for {name}: log in again with `hf auth login`, or check HF_TOKEN",
        "offline": (f"{name} is not in the Hugging Face cache and offline mode (HF_HUB_OFFLINE=1) forbids downloading it: "
                    "unset HF_HUB_OFFLINE to download it once, or give a local path"),
        "connection": (f"cannot reach the Hugging Face Hub to download {name}{reason}: check the network connection or proxy "
                       "(HTTPS_PROXY); if it is in the cache already, set HF_HUB_OFFLINE=1 to use the cache"),
    }[case]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The fake Hub: `hub.case = ...` picks its answer; `hub.requests` lists what it was asked. The HF cache is
    an empty folder, and huggingface_hub's waits between retries are skipped."""
    from huggingface_hub.utils import _http

    client = getattr(_http, "httpx2", None) or getattr(_http, "httpx", None)
    if client is None or not hasattr(_http, "set_client_factory"):
        pytest.skip("this huggingface_hub has no httpx client factory to put the fake Hub behind")
    state = SimpleNamespace(case="gated", requests=[])

    def answer(request):
        state.requests.append(f"{request.method} {request.url.path}")
        if state.case == "connection":
            raise client.ConnectError("[Errno -2] Name or service not known", request=request)
        assert state.case != "offline", f"offline mode let a request through: {request.url}"
        code, headers = ANSWERS[state.case]
        return client.Response(code, headers=headers, json={"error": headers.get("X-Error-Message", "")})

    _http.set_client_factory(lambda: client.Client(transport=client.MockTransport(answer), follow_redirects=True,
                                                   event_hooks={"request": [_http.hf_request_event_hook]}))
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("ORPO_CACHE", str(tmp_path / "orpo-cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield state
    _http.set_client_factory(_http.default_client_factory)


def go_offline(monkeypatch, hub) -> None:
    """HF_HUB_OFFLINE=1 as huggingface_hub, transformers and datasets read it (at import, so set where they keep it)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    hub.case = "offline"


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def last_line(err: list[str]) -> str:
    """The error line of a command that printed its own progress first (bars, 'exporting ...'): the last line,
    the only one from an error, and no traceback."""
    assert not any("Traceback" in line or line.startswith(("orpo:", "ERROR", "WARNING")) for line in err[:-1]), err
    return err[-1]


# ---------------------------------------------------------------- train: tokenizer, model, dataset


@pytest.mark.parametrize("case", CASES)
def test_train_the_tokenizers_download(case, hub, monkeypatch, pairs_file, tmp_path, capsys):
    """The first thing `orpo train` fetches is the tokenizer: the reference recipe's Llama 3 is gated."""
    if case == "offline":
        go_offline(monkeypatch, hub)
    hub.case = case
    revision = ["model.revision=v9"] if case == "revision" else []
    code, err = run_cli(["train", *tiny_overrides(MODEL, pairs_file, tmp_path / "run"), *revision], capsys)
    assert (code, err) == (1, [expected(case, "model", MODEL)])
    assert not (tmp_path / "run").exists()
    assert (hub.requests == []) == (case == "offline")


@pytest.mark.parametrize("case", CASES)
def test_train_the_models_download(case, hub, monkeypatch, chat_model_dir, pairs_file, tmp_path, capsys):
    """The tokenizer came (here: from a local folder), the weights do not; the data was tokenized before."""
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda source, **kwargs: real(str(chat_model_dir)))
    if case == "offline":
        go_offline(monkeypatch, hub)
    hub.case = case
    revision = ["model.revision=v9"] if case == "revision" else []
    code, err = run_cli(["train", *tiny_overrides(MODEL, pairs_file, tmp_path / "run"), *revision], capsys)
    assert (code, last_line(err)) == (1, expected(case, "model", MODEL))


@pytest.mark.parametrize("case", [c for c in CASES if c != "revision"])  # a dataset has no revision key
def test_train_the_datasets_download(case, hub, monkeypatch, chat_model_dir, tmp_path, capsys):
    """data.path=owner/name reads a Hub dataset through datasets.load_dataset."""
    if case == "offline":
        go_offline(monkeypatch, hub)
    hub.case = case
    code, err = run_cli(["train", *tiny_overrides(chat_model_dir, DATA, tmp_path / "run")], capsys)
    assert (code, err) == (1, [expected(case, "dataset", DATA)])


def test_a_name_that_cannot_be_a_repo_id(hub, pairs_file, tmp_path, capsys):
    """Neither a local folder nor a valid Hub id: huggingface_hub refuses it before any request."""
    code, err = run_cli(["train", *tiny_overrides("my model!", pairs_file, tmp_path / "run")], capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("orpo: error: my model! is not a valid Hub repo id (Repo id must use alphanumeric chars")
    assert err[0].endswith("): check the name") and hub.requests == []


# ---------------------------------------------------------------- the other commands


@pytest.fixture
def hub_run(tmp_path) -> Path:
    """A LoRA run folder whose base model is a Hub id (no weights: the base is what fails)."""
    run = tmp_path / "hub-run"
    (run / "final").mkdir(parents=True)
    save_config(load_config(None, [f"model.name_or_path={MODEL}"]), run / "config.yaml")
    (run / "final" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", CASES)
def test_eval_of_a_hub_model(case, hub, monkeypatch, capsys):
    """Also at the revision the line asks for (model.revision is kept for a base model named on the line)."""
    if case == "offline":
        go_offline(monkeypatch, hub)
    hub.case = case
    revision = ["model.revision=v9"] if case == "revision" else []
    code, err = run_cli(["eval", MODEL, "--no-generate", *revision], capsys)
    assert (code, err) == (1, [expected(case, "model", MODEL)])


@pytest.mark.parametrize("case", CASES)
def test_merge_of_a_run_on_a_hub_base(case, hub, hub_run, monkeypatch, tmp_path, capsys):
    if case == "offline":
        go_offline(monkeypatch, hub)
    hub.case = case
    if case == "revision":
        save_config(load_config(None, [f"model.name_or_path={MODEL}", "model.revision=v9"]), hub_run / "config.yaml")
    code, err = run_cli(["merge", str(hub_run), "--out", str(tmp_path / "merged")], capsys)
    assert (code, err) == (1, [expected(case, "model", MODEL)])
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("command", ["chat", "export", "serve", "data inspect"])
def test_every_command_that_downloads(command, hub, hub_run, pairs_file, tmp_path, capsys):
    """One case each (gated, the reference recipe's first failure): the line is the same in every command."""
    argv = {"chat": ["chat", MODEL, "--prompt", "hi"],
            "export": ["export", str(hub_run), "--gguf", str(tmp_path / "m.gguf")],
            "serve": ["serve", str(hub_run), "--engine", "llama-cpp", "--port", str(free_port())],
            "data inspect": ["data", "inspect", f"model.name_or_path={MODEL}", f"data.path={pairs_file}"]}[command]
    if command == "serve":
        pytest.importorskip("llama_cpp")
    code, err = run_cli(argv, capsys)
    assert (code, last_line(err)) == (1, expected("gated", "model", MODEL))
    assert len(err) == 1 or (command == "serve" and err[0].startswith(f"exporting {hub_run}"))  # serve says what it makes first
    assert not (tmp_path / "m.gguf").exists()


# ---------------------------------------------------------------- push


@pytest.fixture
def merged_folder(tmp_path) -> Path:
    """What `orpo push` uploads, without weights: a merged model's config files."""
    folder = tmp_path / "merged"
    folder.mkdir()
    save_config(load_config(None), folder / "orpo_config.yaml")
    (folder / "config.json").write_text("{}")
    return folder


PUSHED = {
    "token": "the Hub refused your token (401 Unauthorized) for model me/tiny: log in again with `hf auth login`, or check HF_TOKEN",
    "forbidden": ('your token may not write to model me/tiny (403 Forbidden: You don\'t have the rights to create a model under '
                  f'the namespace "someone"): {LOGIN} using a token with write access, to your own namespace or an '
                  "organization's you may write to"),
    "not found": (f"model me/tiny was not found on the Hugging Face Hub: check the name (owner/name, where owner is you or "
                  f"an organization you may write to); a private repo also needs you to {LOGIN}"),
    "connection": ("cannot reach the Hugging Face Hub to upload to model me/tiny (ConnectError: [Errno -2] Name or service "
                   "not known): check the network connection or proxy (HTTPS_PROXY)"),
    "offline": "HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it to push to model me/tiny",
}


@pytest.mark.parametrize("case", list(PUSHED))
def test_push_failures(case, hub, merged_folder, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETtokenDoNotLeak123")
    if case == "offline":
        go_offline(monkeypatch, hub)
    hub.case = case
    code, err = run_cli(["push", str(merged_folder), "--repo", "me/tiny"], capsys)
    assert (code, err) == (1, [f"orpo: error: {PUSHED[case]}"])
    assert "hf_SECRET" not in "".join(err)
    assert ("POST /api/repos/create" in hub.requests) == (case != "offline")
    assert not any("preupload" in r or "/commit/" in r for r in hub.requests)  # no upload was tried after that


# ---------------------------------------------------------------- the translation itself


def test_anything_else_passes_through_unchanged(hub):
    """A local folder's own error, a bug, a config error: not a Hub failure, so not rewritten."""
    for error in (ValueError("model.chat_template=own but x has no chat template"), KeyError("q_proj"),
                  OSError("x does not appear to have a file named config.json")):
        with pytest.raises(type(error)) as caught, hub_errors(MODEL):
            raise error
        assert caught.value is error


def test_the_whole_chain_is_searched():
    """transformers keeps the original as __cause__ of its OSError; a retry may put it in __context__."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        try:
            raise LocalEntryNotFoundError("cannot find the requested files") from ConnectionRefusedError(111, "Connection refused")
        except LocalEntryNotFoundError:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")  # noqa: B904 - a context, as in the libraries
    except OSError as exc:
        assert [type(e).__name__ for e in chain(exc)] == ["OSError", "LocalEntryNotFoundError", "ConnectionRefusedError"]
        line = explain(exc, MODEL)
    assert line.startswith(f"cannot reach the Hugging Face Hub to download model {MODEL} (ConnectionRefusedError: ")
    assert "\n" not in line


def test_a_hub_error_is_a_runtime_error_with_one_line():
    with pytest.raises(HubError) as caught, hub_errors(DATA, "dataset"):
        raise ConnectionError(f"Couldn't reach '{DATA}' on the Hub (OfflineModeIsEnabled)")  # datasets' words
    assert isinstance(caught.value, RuntimeError) and str(caught.value) == expected("offline", "dataset", DATA).removeprefix("orpo: error: ")


def test_the_reference_recipe_offline_is_one_line(tmp_path):
    """What a new user meets first, as they meet it: `orpo train recipes/llama3-8b-orpo-qlora.yaml` with
    HF_HUB_OFFLINE=1 and an empty cache prints one line and nothing else (no traceback, no warning), exit 1."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "llama3-8b-orpo-qlora.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "ORPO_CACHE": str(tmp_path / "orpo")}
    env.pop("HF_TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "orpo.cli", "train", str(recipe), f"output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=env, timeout=300)
    repo = load_config(recipe).model.name_or_path
    assert (done.returncode, done.stderr.strip().splitlines()) == (1, [expected("offline", "model", repo)]), done.stderr[-3000:]
