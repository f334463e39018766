"""`orpo serve`: an OpenAI-compatible API (/v1/chat/completions, /v1/models) for a run or a model, by starting an
existing engine in the foreground; orpo runs no server of its own.

Two engines, chosen by what the machine has (vLLM with CUDA, else llama.cpp):

    llama-cpp  llama-cpp-python's server on a GGUF file. A run, merged folder or model folder is exported first
               (export.export_gguf, checked by llama.cpp) to <folder>/gguf/model.f16.gguf and reused while it
               is newer than the weights; a base model that is no local folder goes to the orpo cache. The file
               carries the chat template and EOS = the end-of-turn token, and no chat_format is passed, so the
               server formats with that template and stops at the end of the turn (llama_cpp/llama.py: with
               chat_format unset and `tokenizer.chat_template` in the metadata it uses that template, stopping at
               the file's EOS). A .gguf given directly must therefore have a template.
    vllm       `vllm serve` on a model folder; a LoRA run is served as its base plus the adapter
               (--enable-lora). An adapter with trained embedding rows (the ChatML set-up's
               `trainable_token_indices`, or `modules_to_save`) is merged first (merge.run_merge, checked): vLLM's
               LoRA loader (vllm/lora/lora_model.py) accepts only LoRA A/B weights of target modules, so such an
               adapter is refused on the first request, or its embedding rows are dropped.

The API binds 127.0.0.1 unless --host says otherwise; another host without a key gets a warning, since anyone
who can reach the port can then use the model. The key (--api-key, else ORPO_API_KEY, else the engine's own
variable) reaches the engine in its environment, never on its command line, where any local user could read it
(`ps`, /proc/PID/cmdline): llama-cpp-python's server reads API_KEY, vLLM reads VLLM_API_KEY. `--print` shows the
command without running anything (no export or merge either: a note says what would be made first) and never
the key.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from ..files import cache_root
from .export import CheckFailed, ExportError, export_gguf
from .merge import run_merge
from .runs import is_run, resolve

ENGINES = ("llama-cpp", "vllm")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
GGUF_NAME = "model.f16.gguf"
MERGED_NAME = "merged-bf16"
# llama-cpp-python's server defaults to n_ctx 2048; the model's own context, at most this (the KV cache of a
# 128k-context model would not fit in memory).
MAX_CTX = 4096
# vLLM's allowed --max-lora-rank values: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
# (vllm/config/lora.py); any other value is refused at start-up.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
WEIGHT_FILES = (".safetensors", ".bin", ".json")  # what a GGUF or merged model is made from (not README.md)
STOP_WAIT_S = 15  # after Ctrl-C or SIGTERM: how long the engine may take to shut down before it is killed
# The environment variable each engine takes its API key from. llama-cpp-python: ServerSettings.api_key in
# llama_cpp/server/settings.py is a pydantic-settings field without a prefix, so API_KEY (not llama.cpp's own
# llama-server's LLAMA_API_KEY: that binary is not what runs). vLLM: `args.api_key or envs.VLLM_API_KEY` in
# vllm/entrypoints/openai/api_server.py.
KEY_VARIABLE = {"llama-cpp": "API_KEY", "vllm": "VLLM_API_KEY"}


def default_engine() -> str:
    import torch

    return "vllm" if torch.cuda.is_available() else "llama-cpp"


def lora_rank(r: int) -> int:
    """The adapter's rank rounded up to a --max-lora-rank vLLM accepts."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise ExportError(f"LoRA rank {r} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]}); merge the run first (orpo merge)")


def model_name(spec: str) -> str:
    """The name clients send as `model`: the folder's or file's name, else the spec itself (a Hub id)."""
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.name == GGUF_NAME and path.parent.name == "gguf":  # our own export's
        return path.resolve().parent.parent.name
    if path.suffix == ".gguf":
        return path.stem
    return path.resolve().name if path.exists() else spec


# ---------------------------------------------------------------- llama.cpp


def gguf_for(spec: str) -> Path:
    """Where the GGUF of `spec` is, or will be exported to."""
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return path
    if path.is_dir():
        return path / "gguf" / GGUF_NAME
    return cache_root() / "gguf" / re.sub(r"[^A-Za-z0-9._-]+", "--", spec) / GGUF_NAME


def gguf_facts(path: Path) -> tuple[str | None, int | None]:
    """(chat template, trained context length) from a GGUF file's metadata."""
    import gguf

    reader = gguf.GGUFReader(path)

    def value(key: str):
        field = reader.get_field(key)
        return field.contents() if field is not None else None

    return value("tokenizer.chat_template"), value(f"{value('general.architecture')}.context_length")


def llama_cpp_command(gguf: Path, name: str, host: str, port: int) -> list[str]:
    """Flag names are llama_cpp/server/settings.py's fields; no --chat_format, so the GGUF's template is used. The
    context: the model's, at most MAX_CTX (MAX_CTX while the file is not exported yet)."""
    n_ctx = MAX_CTX
    if gguf.is_file():
        template, trained = gguf_facts(gguf)
        if not template:
            raise ExportError(f"{gguf} has no chat template (tokenizer.chat_template): the server could not format "
                              "a conversation; export the model with orpo export, which writes one")
        n_ctx = min(int(trained), MAX_CTX) if trained else MAX_CTX
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", name,
            "--n_ctx", str(n_ctx), "--host", host, "--port", str(port)]


def weights_dir(spec: str) -> Path | None:
    """The folder whose files a GGUF or merged model is made from (None: nothing local to compare with)."""
    path = Path(spec).expanduser()
    if is_run(path):
        return path / "final"
    return path if path.is_dir() else None


def outdated(made: Path, spec: str) -> bool:
    """`made` is missing or older than a file of the weights it was made from."""
    if not made.exists():
        return True
    source = weights_dir(spec)
    stamps = [p.stat().st_mtime for p in source.iterdir() if p.suffix in WEIGHT_FILES] if source else []
    return bool(stamps) and max(stamps) > made.stat().st_mtime


# ---------------------------------------------------------------- vLLM


def adapter_config(target) -> dict | None:
    """A LoRA run's adapter_config.json; None for anything else."""
    if not target.is_adapter:
        return None
    return json.loads((target.final_dir / "adapter_config.json").read_text())


def merge_reason(target) -> str | None:
    """Why vLLM cannot serve this run as base + adapter; None when it can."""
    config = adapter_config(target)
    if config is None:
        return None
    if config.get("modules_to_save") or config.get("trainable_token_indices"):
        return "its adapter trains embedding rows (ChatML tokens), which vLLM's LoRA loader does not take"
    if target.config.model.gguf_file:
        return "its base is a GGUF file, which vLLM does not combine with a LoRA adapter"
    return None


def base_of(target) -> str:
    """The base model of a run, as vLLM takes it: a local folder (absolute) or a Hub id."""
    from ..model.builtin import builtin_model_dir
    from ..model.load import BUILTIN, looks_local

    name = target.config.model.name_or_path
    if name == BUILTIN:
        return str(builtin_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    if looks_local(name):
        raise ExportError(f"{target.spec}: its base model.name_or_path={name} is no folder here")
    return name


def vllm_binary() -> str:
    """`vllm` next to this interpreter (a venv that is not activated), else on PATH."""
    local = Path(sys.executable).parent / "vllm"
    return str(local) if local.is_file() else "vllm"


def vllm_command(spec: str, host: str, port: int, overrides=()) -> list[str]:
    target = resolve(spec, overrides)
    name = model_name(spec)
    command = [vllm_binary(), "serve"]
    adapter = adapter_config(target)
    if merge_reason(target):
        command += [str(Path(spec).expanduser().resolve() / MERGED_NAME), "--served-model-name", name]
    elif adapter is not None:
        command += [base_of(target), "--enable-lora", "--lora-modules", f"{name}={target.final_dir.resolve()}",
                    "--max-lora-rank", str(lora_rank(int(adapter["r"])))]
        if (target.final_dir / "tokenizer_config.json").is_file():  # the tokenizer and chat template it trained with
            command += ["--tokenizer", str(target.final_dir.resolve())]
        if target.config.model.revision:
            command += ["--revision", target.config.model.revision]
    elif target.kind == "run":  # full fine-tuning: final/ is the model
        command += [str(target.final_dir.resolve()), "--served-model-name", name]
    else:
        command += [base_of(target) if target.kind == "base" else str(Path(spec).expanduser().resolve()),
                    "--served-model-name", name]
    if target.config.model.trust_remote_code:
        command.append("--trust-remote-code")
    return command + ["--host", host, "--port", str(port)]


# ---------------------------------------------------------------- the command


def serve_command(spec: str, engine: str, host: str, port: int, overrides=()) -> list[str]:
    """The engine's command line for what is on disk now (the GGUF or merged folder it names may not exist yet).
    It never holds the API key: see engine_env."""
    if engine == "llama-cpp":
        return llama_cpp_command(gguf_for(spec), model_name(spec), host, port)
    return vllm_command(spec, host, port, overrides)


def api_key_for(engine: str, given: str | None) -> str | None:
    """--api-key, else $ORPO_API_KEY, else the engine's own variable (which it would read anyway); None: no key."""
    return given or os.environ.get("ORPO_API_KEY") or os.environ.get(KEY_VARIABLE[engine]) or None


def engine_env(engine: str, api_key: str | None) -> dict[str, str]:
    """The engine's environment: orpo's, without HOST and PORT (llama_cpp.server prefers them to --host/--port),
    with the key in the variable the engine reads (a process's environment is readable by its user and root only,
    its command line by every local user)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT", *KEY_VARIABLE.values())}
    if api_key:
        env[KEY_VARIABLE[engine]] = api_key
    return env


def require_engine(engine: str) -> None:
    """One line on how to install the engine when it is missing."""
    if engine == "llama-cpp" and importlib.util.find_spec("llama_cpp") is None:
        raise ExportError("--engine llama-cpp needs llama-cpp-python's server: pip install 'orpo[serve]' "
                          "(builds llama.cpp; or pip install 'llama-cpp-python[server]')")
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ExportError("--engine vllm needs vLLM (Linux, CUDA): pip install vllm; or use --engine llama-cpp")


def check_port(host: str, port: int) -> None:
    """Fail now, not after an export, when host:port cannot be bound (as the server binds it: SO_REUSEADDR)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ExportError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ExportError(f"port {port} on {host} is not free ({exc.strerror}): stop what uses it or pick another with --port") from None


def prepare(spec: str, engine: str, dry: bool, overrides=()) -> int:
    """Make the GGUF (llama-cpp) or merged folder (vLLM) the command needs, unless it is current; `dry`: only say
    so. Returns 1 when its check fails."""
    if engine == "llama-cpp":
        gguf = gguf_for(spec)
        if Path(spec).suffix == ".gguf" or not outdated(gguf, spec):
            return 0
        if dry:
            print(f"note: {gguf} is not exported yet (or older than the weights); `orpo serve` exports it first", file=sys.stderr)
            return 0
        print(f"exporting {spec} to {gguf} (first use; reused while the weights do not change)", file=sys.stderr)
        try:
            export_gguf(spec, gguf, "f16", force=True, overrides=overrides)
        except CheckFailed:
            return 1
        return 0
    target = resolve(spec, overrides)
    reason = merge_reason(target)
    if reason is None:
        return 0
    merged = Path(spec).expanduser() / MERGED_NAME
    print(f"serving {spec} merged ({merged}): {reason}", file=sys.stderr)
    if not outdated(merged / "orpo_merge.json", spec) and json.loads((merged / "orpo_merge.json").read_text()).get("passed"):
        return 0
    if dry:
        print(f"note: {merged} is not merged yet; `orpo serve` merges it first", file=sys.stderr)
        return 0
    return run_merge(spec, "bf16", str(merged), overrides=overrides)


def run_foreground(command: list[str], env: dict[str, str]) -> int:
    """The engine in the foreground until it exits. Ctrl-C reaches it directly (the terminal signals the whole
    process group), so orpo only waits; SIGTERM sent to orpo is passed on. Returns its exit code (128 + signal
    when a signal ended it)."""
    proc = subprocess.Popen(command, env=env)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate()) if main else None
    try:
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # the engine got the same Ctrl-C and is shutting down
            code = wait_or_stop(proc)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return 128 - code if code < 0 else code


def wait_or_stop(proc: subprocess.Popen) -> int:
    """Its exit code once it exits; terminated, then killed, when it takes longer than STOP_WAIT_S (the signal
    reached orpo only)."""
    for stop in (lambda: None, proc.terminate, proc.kill):
        stop()
        try:
            return proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def run_serve(spec: str, engine: str | None = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
              print_only: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> int:
    """`orpo serve`: exit code of the engine (0 with --print). One line each: ExportError on bad options, a port in
    use or a missing engine (exit 2); FileNotFoundError on what is not on disk (a missing .gguf or folder, a run
    without final/: exit 1, as in every command); HubError when a base model cannot be downloaded (exit 1)."""
    engine = engine or default_engine()
    if engine not in ENGINES:
        raise ExportError(f"--engine {engine}: not one of {', '.join(ENGINES)}")
    api_key = api_key_for(engine, api_key)
    if not 0 < port < 65536:
        raise ExportError(f"--port {port}: not a port (1-65535)")
    if Path(spec).expanduser().suffix == ".gguf" and engine == "vllm":
        raise ExportError(f"{spec}: vLLM serves model folders; serve a .gguf file with --engine llama-cpp")
    if Path(spec).expanduser().suffix == ".gguf":
        if not Path(spec).expanduser().is_file():
            raise FileNotFoundError(f"{spec}: no such file")
    else:
        resolve(spec, overrides)  # a missing folder or an unfinished run fails here, before anything is made
    if not print_only:
        require_engine(engine)
        check_port(host, port)
    if host not in LOOPBACK and not api_key:
        print(f"WARNING: --host {host} without --api-key (or ORPO_API_KEY): anyone who can reach port {port} can use the model",
              file=sys.stderr)
    code = prepare(spec, engine, print_only, overrides)
    if code:
        return code
    command = serve_command(spec, engine, host, port, overrides)
    if print_only:
        print(shlex.join(command))
        if api_key:
            print(f"note: the API key is not shown; the engine takes it from {KEY_VARIABLE[engine]} in its environment "
                  "(set it there to run this command yourself)", file=sys.stderr)
        return 0
    shown = f"[{host}]" if ":" in host else host
    print(f"serving at http://{shown}:{port}/v1 with model name '{model_name(spec)}' ({engine}; Ctrl-C stops it)", flush=True)
    return run_foreground(command, engine_env(engine, api_key))
