"""`orpo serve`: the engine commands built for each kind of target, the refusals (one line each), and a live
llama.cpp server answering an OpenAI client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import PAIRS, tiny_overrides, write_jsonl
from orpo.after import serve
from orpo.after.export import CheckFailed, ExportError
from orpo.after.serve import lora_rank, run_serve, serve_command
from orpo.config import load_config, save_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_run(root: Path, base: Path, final: dict[str, dict]) -> Path:
    """A run folder as `orpo train` leaves it, without weights: config.yaml + final/ holding these JSON files."""
    root.mkdir(parents=True)
    save_config(load_config(None, [f"model.name_or_path={base}"]), root / "config.yaml")
    (root / "final").mkdir()
    for name, content in final.items():
        (root / "final" / name).write_text(json.dumps(content))
    return root


def adapter(r: int, **extra) -> dict:
    return {"r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"], "modules_to_save": None,
            "trainable_token_indices": None, **extra}


def write_gguf(path: Path, template: str | None, context: int = 512) -> Path:
    """A tiny GGUF file: metadata (with or without a chat template) and one tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(context)
    if template:
        writer.add_chat_template(template)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


@pytest.fixture
def started(monkeypatch):
    """run_serve with the engine 'installed' and its start recorded instead of run: the commands, and the
    environment each was given."""
    record = SimpleNamespace(commands=[], envs=[])
    monkeypatch.setattr(serve, "require_engine", lambda engine: None)
    monkeypatch.setattr(serve, "run_foreground", lambda command, env: record.commands.append(command) or record.envs.append(env) or 0)
    for name in ("ORPO_API_KEY", *serve.KEY_VARIABLE.values()):
        monkeypatch.delenv(name, raising=False)
    return record


# ---------------------------------------------------------------- vLLM


@pytest.mark.parametrize(("r", "want"), [(1, 1), (4, 8), (8, 8), (12, 16), (16, 16), (17, 32), (300, 320), (512, 512)])
def test_lora_rank_rounds_up_to_a_value_vllm_accepts(r, want):
    assert lora_rank(r) == want


def test_a_rank_above_vllms_largest_is_refused():
    with pytest.raises(ExportError) as exc:
        lora_rank(1024)
    assert "512" in one_line(exc)


def test_vllm_serves_a_merged_folder_under_its_name(tmp_path, capsys):
    merged = tmp_path / "my-merged"
    merged.mkdir()
    save_config(load_config(None), merged / "orpo_config.yaml")
    (merged / "config.json").write_text("{}")
    assert run_serve(str(merged), engine="vllm", port=8123, print_only=True) == 0
    out = capsys.readouterr()
    assert out.out.strip().endswith(f"serve {merged} --served-model-name my-merged --host 127.0.0.1 --port 8123")
    assert out.err == ""  # loopback: no warning


def test_vllm_serves_a_full_run_from_final(chat_model_dir, tmp_path):
    run = fake_run(tmp_path / "full", chat_model_dir, {"config.json": {}})
    command = serve_command(str(run), "vllm", "127.0.0.1", 8000)
    assert command[1:] == ["serve", str(run / "final"), "--served-model-name", "full", "--host", "127.0.0.1", "--port", "8000"]


@pytest.mark.parametrize(("r", "max_rank"), [(12, "16"), (16, "16")])
def test_vllm_serves_a_lora_run_as_base_plus_adapter(chat_model_dir, tmp_path, r, max_rank):
    run = fake_run(tmp_path / "lora", chat_model_dir, {"adapter_config.json": adapter(r), "tokenizer_config.json": {}})
    command = serve_command(str(run), "vllm", "127.0.0.1", 8000)
    assert command[1:7] == ["serve", str(chat_model_dir), "--enable-lora", "--lora-modules", f"lora={run / 'final'}", "--max-lora-rank"]
    assert command[7] == max_rank
    assert command[command.index("--tokenizer") + 1] == str(run / "final")  # its tokenizer and chat template
    assert "--served-model-name" not in command  # the adapter's name is the model name


@pytest.mark.parametrize("rows", [{"trainable_token_indices": [400, 401]}, {"modules_to_save": ["embed_tokens"]}])
def test_an_adapter_with_embedding_rows_is_served_merged(chat_model_dir, tmp_path, capsys, rows):
    run = fake_run(tmp_path / "chatml", chat_model_dir, {"adapter_config.json": adapter(8, **rows)})
    assert run_serve(str(run), engine="vllm", print_only=True) == 0
    out = capsys.readouterr()
    assert "trains embedding rows" in out.err and "merges it first" in out.err
    assert out.out.strip().split()[1:5] == ["serve", str(run / "merged-bf16"), "--served-model-name", "chatml"]
    assert not (run / "merged-bf16").exists()  # --print makes nothing


def test_a_chatml_run_is_merged_checked_then_served(base_model_dir, tmp_path, started, monkeypatch, capsys):
    """A real ChatML run (base without a template: its new token rows train): merged once, reused after."""
    from orpo.after.card import finish_run
    from orpo.training.loop import train

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(base_model_dir, data, run, max_steps=1, eval_on_start="false", eval_steps="null")), finish=finish_run)
    assert json.loads((run / "final" / "adapter_config.json").read_text())["trainable_token_indices"]
    port = free_port()
    assert run_serve(str(run), engine="vllm", port=port) == 0
    assert "PASS" in capsys.readouterr().out
    assert json.loads((run / "merged-bf16" / "orpo_merge.json").read_text())["passed"]
    assert started.commands[0][2] == str(run / "merged-bf16")
    monkeypatch.setattr(serve, "run_merge", lambda *a, **k: pytest.fail("merged again"))
    assert run_serve(str(run), engine="vllm", port=port) == 0
    assert started.commands[1] == started.commands[0]


def test_vllm_missing_is_one_line(tmp_path, chat_model_dir, monkeypatch):
    real = serve.importlib.util.find_spec
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ExportError) as exc:
        run_serve(str(chat_model_dir), engine="vllm", port=free_port())
    assert "pip install vllm" in one_line(exc)


def test_vllm_does_not_take_a_gguf_file(tmp_path):
    with pytest.raises(ExportError) as exc:
        run_serve(str(write_gguf(tmp_path / "m.gguf", "{{ x }}")), engine="vllm", print_only=True)
    assert "--engine llama-cpp" in one_line(exc)


# ---------------------------------------------------------------- llama.cpp


def test_llama_cpp_print_names_the_gguf_it_would_export(chat_model_dir, tmp_path, capsys):
    run = fake_run(tmp_path / "demo", chat_model_dir, {"adapter_config.json": adapter(8)})
    assert run_serve(str(run), engine="llama-cpp", port=8124, api_key="s3cret-key", print_only=True) == 0
    out = capsys.readouterr()
    gguf = run / "gguf" / "model.f16.gguf"
    assert out.out.strip() == (f"{sys.executable} -m llama_cpp.server --model {gguf} --model_alias demo --n_ctx 4096 "
                               "--host 127.0.0.1 --port 8124")
    assert "--chat_format" not in out.out  # the GGUF's own template is used
    assert f"note: {gguf} is not exported yet" in out.err and not gguf.exists()
    assert "s3cret-key" not in out.out + out.err and "takes it from API_KEY in its environment" in out.err


def test_llama_cpp_exports_on_first_use_then_reuses(chat_model_dir, tmp_path, started, monkeypatch, capsys):
    exported = []

    def export(spec, out, kind, force=False, overrides=()):
        exported.append((spec, Path(out), kind))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_gguf(Path(out), "{{ messages }}", context=512)

    monkeypatch.setattr(serve, "export_gguf", export)
    model = tmp_path / "model"
    model.mkdir()
    for f in chat_model_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    gguf = model / "gguf" / "model.f16.gguf"
    assert run_serve(str(model), engine="llama-cpp", port=free_port()) == 0
    assert exported == [(str(model), gguf, "f16")]
    command = started.commands[0]
    assert command[command.index("--model") + 1] == str(gguf)
    assert command[command.index("--n_ctx") + 1] == "512"  # the model's context, below the 4096 cap
    assert "http://127.0.0.1:" in capsys.readouterr().out
    assert run_serve(str(model), engine="llama-cpp", port=free_port()) == 0
    assert len(exported) == 1  # reused
    later = gguf.stat().st_mtime + 10
    os.utime(model / "config.json", (later, later))  # the weights changed since
    assert run_serve(str(model), engine="llama-cpp", port=free_port()) == 0
    assert len(exported) == 2


def test_a_failed_export_check_exits_1(chat_model_dir, started, monkeypatch):
    def export(*a, **k):
        raise CheckFailed({})

    monkeypatch.setattr(serve, "export_gguf", export)
    monkeypatch.setattr(serve, "gguf_for", lambda spec: Path("/nonexistent/model.f16.gguf"))
    assert run_serve(str(chat_model_dir), engine="llama-cpp", port=free_port()) == 1
    assert started.commands == []


def test_a_gguf_without_chat_template_is_refused(tmp_path):
    path = write_gguf(tmp_path / "plain.gguf", None)
    with pytest.raises(ExportError) as exc:
        run_serve(str(path), engine="llama-cpp", print_only=True)
    assert "no chat template" in one_line(exc)


def test_a_missing_gguf_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:  # a file error: exit 1, as a missing folder or a run without final/
        run_serve(str(tmp_path / "absent.gguf"), engine="llama-cpp", print_only=True)
    assert "no such file" in one_line(exc)


def test_a_gguf_with_a_template_is_served_as_it_is(tmp_path, capsys):
    path = write_gguf(tmp_path / "chat.gguf", "{{ messages }}", context=8192)
    assert run_serve(str(path), engine="llama-cpp", print_only=True) == 0
    words = capsys.readouterr().out.split()
    assert words[words.index("--model") + 1] == str(path)
    assert words[words.index("--model_alias") + 1] == "chat"
    assert words[words.index("--n_ctx") + 1] == "4096"  # capped


def test_a_port_in_use_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "require_engine", lambda engine: None)
    path = write_gguf(tmp_path / "chat.gguf", "{{ messages }}")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ExportError) as exc:
            run_serve(str(path), engine="llama-cpp", port=port)
    assert f"port {port}" in one_line(exc)


def test_llama_cpp_missing_is_one_line(tmp_path, monkeypatch):
    real = serve.importlib.util.find_spec
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(ExportError) as exc:
        run_serve(str(write_gguf(tmp_path / "chat.gguf", "{{ messages }}")), engine="llama-cpp", port=free_port())
    assert "pip install 'orpo[serve]'" in one_line(exc)


@pytest.mark.parametrize(("host", "key", "warned"), [("0.0.0.0", None, True), ("0.0.0.0", "k", False), ("localhost", None, False), ("::1", None, False)])
def test_an_open_host_without_a_key_is_warned(tmp_path, capsys, monkeypatch, host, key, warned):
    for name in ("ORPO_API_KEY", *serve.KEY_VARIABLE.values()):
        monkeypatch.delenv(name, raising=False)
    path = write_gguf(tmp_path / "chat.gguf", "{{ messages }}")
    assert run_serve(str(path), engine="llama-cpp", host=host, api_key=key, print_only=True) == 0
    err = capsys.readouterr().err
    assert ("WARNING" in err and "--api-key" in err) == warned


@pytest.mark.parametrize(("engine", "variable"), [("llama-cpp", "API_KEY"), ("vllm", "VLLM_API_KEY")])
def test_the_key_reaches_the_engine_in_its_environment(tmp_path, started, monkeypatch, capsys, engine, variable):
    """Never on its command line, which every local user can read (ps, /proc/PID/cmdline). The key is --api-key,
    else ORPO_API_KEY, else the engine's own variable; HOST and PORT are not passed on (llama_cpp.server prefers
    them to --host/--port)."""
    if engine == "llama-cpp":
        target = write_gguf(tmp_path / "chat.gguf", "{{ messages }}")
    else:
        target = tmp_path / "merged"
        target.mkdir()
        save_config(load_config(None), target / "orpo_config.yaml")
        (target / "config.json").write_text("{}")
    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.setenv("PORT", "1")
    other = "VLLM_API_KEY" if variable == "API_KEY" else "API_KEY"
    monkeypatch.setenv(other, "not-this-engines")
    cases = [("given-key", {}, "given-key"), (None, {"ORPO_API_KEY": "orpo-key"}, "orpo-key"),
             (None, {variable: "engine-key"}, "engine-key"), (None, {}, None)]
    for given, env, want in cases:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert run_serve(str(target), engine=engine, host="0.0.0.0", port=free_port(), api_key=given) == 0
        for name in env:
            monkeypatch.delenv(name)
        command, engine_env = started.commands[-1], started.envs[-1]
        assert engine_env.get(variable) == want and other not in engine_env
        assert "HOST" not in engine_env and "PORT" not in engine_env and engine_env["PATH"] == os.environ["PATH"]
        assert "--api-key" not in command and "--api_key" not in command and not any(k in " ".join(command) for k in ("given-key", "orpo-key", "engine-key"))
        assert ("WARNING" in capsys.readouterr().err) == (want is None)


@pytest.mark.parametrize(("kwargs", "says"), [({"engine": "ollama"}, "--engine ollama"), ({"port": 0}, "--port 0"), ({"port": 70000}, "--port 70000")])
def test_bad_options_are_one_line(tmp_path, kwargs, says):
    with pytest.raises(ExportError) as exc:
        run_serve(str(write_gguf(tmp_path / "chat.gguf", "{{ messages }}")), print_only=True, **{"engine": "llama-cpp", **kwargs})
    assert says in one_line(exc)


def test_the_engines_exit_code_is_returned():
    assert serve.run_foreground([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ)) == 3
    assert serve.run_foreground([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"], dict(os.environ)) == 128 + 15


def test_an_engine_that_ignores_ctrl_c_is_stopped(monkeypatch):
    """Ctrl-C sent to orpo alone: the engine is waited for, then terminated."""
    monkeypatch.setattr(serve, "STOP_WAIT_S", 0.2)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert serve.wait_or_stop(proc) == -15
    finally:
        proc.kill()


# ---------------------------------------------------------------- live


@pytest.fixture(scope="module")
def builtin_gguf(tmp_path_factory) -> Path:
    """The builtin SmolLM2-135M-Instruct exported to f16 once (about a minute on 2 cores)."""
    from orpo.after.export import export_gguf

    try:
        from orpo.model.builtin import builtin_model_dir

        builtin_model_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"builtin model unavailable: {exc}")
    path = tmp_path_factory.mktemp("serve") / "smollm2.f16.gguf"
    export_gguf("builtin", path, "f16")
    return path


def wait_for_models(url: str, key: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"orpo serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {key}"})
            with urllib.request.urlopen(request, timeout=2) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"no answer from {url}/models in {timeout} s:\n{log.read_text()[-3000:]}")


def test_llama_cpp_server_answers_an_openai_client(builtin_gguf, tmp_path):
    """`orpo serve` on the exported builtin model: the reply ends at the end-of-turn token (finish_reason stop,
    no <|im_end|> in the text), the key (given in ORPO_API_KEY) is required and on no command line, and stopping
    orpo stops the server and frees the port."""
    from openai import AuthenticationError, OpenAI

    port, key = free_port(), "test-key-9f3c"
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "VLLM_API_KEY")} | {"ORPO_API_KEY": key}
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "orpo.cli", "serve", str(builtin_gguf), "--engine", "llama-cpp",
                                 "--port", str(port)], stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        models = wait_for_models(url, key, proc, log)
        assert [m["id"] for m in models["data"]] == ["smollm2.f16"]
        # what `ps` shows of orpo and of the engine has no key; the engine's environment (its user's and root's
        # to read) has it
        engine_pid = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        for pid in (proc.pid, engine_pid):
            assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert f"API_KEY={key}".encode() in Path(f"/proc/{engine_pid}/environ").read_bytes().split(b"\0")
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=url, api_key="wrong").models.list()
        reply = OpenAI(base_url=url, api_key=key).chat.completions.create(
            model="smollm2.f16", messages=[{"role": "user", "content": "What is 2+2? Reply with only the number."}],
            max_tokens=64, temperature=0)
        text = reply.choices[0].message.content
        print(f"served reply: {text!r} (finish_reason {reply.choices[0].finish_reason})")
        assert text.strip() and "<|im_end|>" not in text
        assert reply.choices[0].finish_reason == "stop"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # SIGTERM was passed on and orpo returned the engine's code: 0, or 128 + 15 where uvicorn re-raises the signal
    # after its graceful shutdown (orpo killed by the signal itself would read -15).
    assert proc.returncode in (0, 128 + 15)
    text = log.read_text()
    assert "Application shutdown complete" in text
    assert f"serving at http://127.0.0.1:{port}/v1 with model name 'smollm2.f16'" in text
    assert "Using fallback chat format" not in text  # llama_cpp/llama.py's fallback when a GGUF has no template
    serve.check_port("127.0.0.1", port)  # the engine (orpo's child) is gone too: nothing listens there
