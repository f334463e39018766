"""Command line: `orpo train [CONFIG.yaml] [key=value ...]`, `orpo sweep`, `orpo plan`, `orpo config`, `orpo eval/merge/export/push/chat/report/
compare/serve`, `orpo data inspect`. A thin layer over the Python API (api.py): parse the line, call the function,
print what it returns, and turn its exceptions into exit codes (only here)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

# MKL may otherwise use fewer threads than asked when the cores are busy, which changes the order of float sums:
# a seeded run must give the same numbers whatever else the machine is doing. Set before torch loads MKL.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

from .config import DEMO, ConfigError, describe_keys, load_config, parse_overrides  # noqa: E402
from .hub_errors import HubError  # noqa: E402


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """The first item is a config file unless it looks like key=value."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def is_main_process() -> bool:
    """False in the processes of a distributed launch other than its first (RANK set by torchrun/accelerate)."""
    return os.environ.get("RANK", "0") == "0"


def cmd_train(args) -> int:
    from . import api

    path, overrides = _split_args(args.items)
    config = load_config(path, overrides, preset=DEMO if path is None else None)  # no file: the embedded demo
    run = api.train(config)
    if not is_main_process():  # under torchrun / accelerate launch, rank 0 alone prints
        return 0
    summary = run.summary
    if "after" in summary:
        from .after.eval import table

        print("\n" + table(["before", "after"], [summary.get("before", {}), summary["after"]]))
    print(f"\nrun folder: {config.output_dir}  (summary.json, metrics.jsonl, final/)")
    return 0


def cmd_sweep(args) -> int:
    from . import api

    path, items = _split_args(args.items)
    overrides = parse_overrides(items)
    config = load_config(path, items, preset=DEMO if path is None else None)
    result = api.sweep(config, args.search, trials=args.trials, time=args.time, objective=args.objective,
                       validation_size=args.validation_size, out=args.out, storage=args.storage, study=args.study,
                       prune=not args.no_prune, prune_after=args.prune_after, stale_after=args.stale_after, **overrides)
    print("\n" + result.table)
    print("files: " + ", ".join(f"{k} {v}" for k, v in result.files.items()))
    return 0


def cmd_plan(args) -> int:
    from . import api
    from .training.plan import render

    path, items = _split_args(args.items)
    config = load_config(path, items, preset=DEMO if path is None else None)
    result = api.plan(config, gpus=args.gpu, num_gpus=args.gpus, engine=args.engine, read_data=not args.no_data)
    print(json.dumps(result.as_dict(), indent=1) if args.json else render(result))
    return 0


def cmd_config(args) -> int:
    rows = describe_keys()
    width = max(len(k) for k, _, _ in rows)
    for key, default, text in rows:
        print(f"{key:<{width}}  {default:<22} {text}")
    return 0


def _remote_code(args) -> list[str]:
    """--trust-remote-code as the override it stands for (a folder's own config cannot set it)."""
    return ["model.trust_remote_code=true"] if args.trust_remote_code else []


def cmd_eval(args) -> int:
    from . import api
    from .after.eval import results_text
    from .training.tracking import strict_json

    items = [*args.items, *_remote_code(args)]
    harness = dict(lm_eval=args.lm_eval.split(","), lm_eval_include=args.lm_eval_include, lm_eval_limit=args.lm_eval_limit) if args.lm_eval else {}
    results = api.evaluate(args.target, args.data, compare=args.compare, samples=args.samples, generate=not args.no_generate,
                           **harness, **parse_overrides(items))
    if args.output or args.json:
        text = strict_json(results)
        if args.output:
            Path(args.output).write_text(text)
        if args.json:
            print(text)
            return 0
    print(results_text(args.target, items, args.data, results, bool(args.lm_eval)))
    return 0


def cmd_merge(args) -> int:
    from . import api
    from .after.merge import merged_text

    try:
        merged = api.merge(args.run_dir, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                           trust_remote_code=args.trust_remote_code)
    except api.CheckFailed as exc:
        print(merged_text(Path(args.out), args.dtype, exc.result))
        return 1
    print(merged_text(merged.path, args.dtype, merged.check))
    return 0


def cmd_push(args) -> int:
    from .after.push import push_run

    url, files = push_run(args.folder, args.repo, args.private, args.dry_run)
    if url is None:
        print(f"dry run: {len(files)} files that would be uploaded to {args.repo} are in {args.dry_run}:")
        print("\n".join(f"  {f}" for f in files))
    else:
        print(f"uploaded {len(files)} files to {url}")
    return 0


def cmd_chat(args) -> int:
    from .after.chat import run_chat

    return run_chat(args.target, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.system, args.seed,
                    _remote_code(args))


def cmd_export(args) -> int:
    from . import api

    try:
        api.export(args.target, args.gguf, type=args.type, quantize=args.quantize or [], modelfile=args.modelfile,
                   force=args.force, trust_remote_code=args.trust_remote_code)
    except api.CheckFailed:  # the check's lines are printed as it runs
        return 1
    return 0


def cmd_serve(args) -> int:
    from .after.serve import run_serve

    return run_serve(args.target, engine=args.engine, host=args.host, port=args.port, api_key=args.api_key,
                     print_only=args.print, overrides=_remote_code(args))


def cmd_compare(args) -> int:
    from .after.compare import CURVES, compare_runs, text

    runs, path = compare_runs(args.runs, args.out)
    print(text(runs))
    print(f"\n{path}: config differences, held-out metrics and {len(CURVES)} overlaid curves (open in a browser)")
    return 0


def cmd_report(args) -> int:
    from . import api

    path = api.report(args.run_dir)
    print(f"report: {path}  (plots in {Path(args.run_dir) / 'plots'})")
    return 0


def cmd_data_inspect(args) -> int:
    import datasets

    from . import api
    from .data.doctor import format_report

    path, overrides = _split_args(args.items)
    datasets.disable_progress_bars()
    result = api.inspect_data(load_config(path, overrides))
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 1 if result["errors"] else 0


EXIT_CODES = """exit status: 0 done, 1 failed (a run, a check or a file error), 2 bad usage or config.
Options go anywhere on the line: orpo train -v, orpo eval RUN --data F key=value. --json always means
machine-readable output on stdout; a file, where wanted, is --output FILE."""


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("orpo")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; -v/--verbose is accepted before and after the command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, and third-party progress bars and loading messages")
    parser = argparse.ArgumentParser(prog="orpo", description="ORPO fine-tuning of language models.", epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common])
    parser.add_argument("--version", action="version", version=f"orpo {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str):
        return sub.add_parser(name, help=text, description=text, epilog=EXIT_CODES, parents=[common],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("train", "fine-tune with ORPO (no config file: the embedded demo's preset)")
    p.add_argument("items", nargs="*", help="[CONFIG.yaml] [key=value ...] (see `orpo config`)")
    p.set_defaults(func=cmd_train)
    p = command("sweep", "choose settings on validation data: an Optuna study, one run folder per trial, the best config")
    p.add_argument("items", nargs="*", help="[CONFIG.yaml] [key=value ...] fixed settings (no file: the embedded demo's preset)")
    p.add_argument("--search", nargs="+", required=True, metavar="SPEC",
                   help="what to search: key=[a,b], key=log(lo,hi), key=uniform(lo,hi), key=int(lo,hi), or a YAML file of them")
    p.add_argument("--trials", type=int, help="finished trials the study should hold (default: the grid's size when every key is a list)")
    p.add_argument("--time", help="start no trial after this long, e.g. 2h (a running trial finishes)")
    p.add_argument("--objective", default="accuracy", choices=["accuracy", "balanced_accuracy", "loss", "task_accuracy"],
                   help="validation metric to choose on (default: preference accuracy)")
    p.add_argument("--validation-size", type=float, default=0.1,
                   help="share (< 1) or count of training rows scored on (default 0.1); 0: score on the held-out split, no test")
    p.add_argument("--out", default="sweep", help="sweep folder: trials, table, best.yaml, compare.html (default sweep)")
    p.add_argument("--storage", metavar="URL", help="shared study: a journal file on a shared disk, or postgresql:// / mysql:// (default OUT/study.journal)")
    p.add_argument("--study", metavar="NAME", help="study name in the storage (default orpo-sweep)")
    p.add_argument("--no-prune", action="store_true", help="train every trial to its end")
    p.add_argument("--prune-after", type=int, default=2, help="finished trials before pruning starts (default 2)")
    p.add_argument("--stale-after", default="10m", help="a trial on another host with no heartbeat this long is failed and rerun (default 10m)")
    p.set_defaults(func=cmd_sweep)

    p = command("plan", "what a job needs before it runs: peak memory by part, time, the GPUs it fits, orpo vs TRL")
    p.add_argument("items", nargs="*", help="[CONFIG.yaml] [key=value ...] (no file: the embedded demo's preset)")
    p.add_argument("--gpu", nargs="+", metavar="NAME", help="GPUs to plan for: H100 H200 A100-80 A100-40 L4 T4 RTX4090, or cpu (default: every GPU)")
    p.add_argument("--gpus", type=int, default=1, metavar="N", help="processes (one GPU each) the job runs on (default 1)")
    p.add_argument("--engine", default="ddp", choices=["ddp", "fsdp2", "zero2", "zero3"], help="how several processes divide the model (default ddp)")
    p.add_argument("--no-data", action="store_true", help="do not read the data: every pair at max_length (the worst case)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
    p = command("config", "list every config key with its default and description")
    p.set_defaults(func=cmd_config)
    p = command("eval", "held-out preference (and task) metrics of a run, merged or base model")
    p.add_argument("target", help="run folder, merged model folder, 'builtin', Hub id or model folder")
    p.add_argument("items", nargs="*", help="key=value config overrides (data.*, beta, per_device_eval_batch_size, ...)")
    p.add_argument("--data", help="preference data to evaluate on (sets data.path)")
    p.add_argument("--compare", metavar="OTHER", help="a second model, shown in the first column (e.g. builtin: the base)")
    p.add_argument("--samples", type=int, default=4, help="generation samples to show (default 4)")
    p.add_argument("--no-generate", action="store_true", help="skip generation (task accuracy and samples)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout (instead of the table)")
    p.add_argument("--output", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--lm-eval", metavar="TASKS", help="also run lm-evaluation-harness tasks (comma-separated; needs orpo[eval])")
    p.add_argument("--lm-eval-include", metavar="DIR", help="folder of extra lm-eval task YAML files")
    p.add_argument("--lm-eval-limit", type=int, help="at most this many documents per lm-eval task")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run (never taken from a folder's config)")
    p.set_defaults(func=cmd_eval)
    p = command("merge", "merge a run's LoRA adapter into its base, save and verify the logits")
    p.add_argument("run_dir")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--out", required=True, help="folder for the merged model (replaced if it exists)")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run (never taken from a folder's config)")
    p.set_defaults(func=cmd_merge)
    p = command("push", "upload a run's adapter or a merged model with a model card to the Hub")
    p.add_argument("folder", help="run folder or merged model folder")
    p.add_argument("--repo", required=True, help="Hub repository, user/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", metavar="FOLDER", help="write what would be uploaded into FOLDER; no network")
    p.set_defaults(func=cmd_push)
    p = command("chat", "chat with a run, merged or base model (tokens streamed)")
    p.add_argument("target", help="run folder, merged model folder, 'builtin', Hub id or model folder")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run (never taken from a folder's config)")
    p.set_defaults(func=cmd_chat)
    p = command("export", "a run or model -> one GGUF file for llama.cpp and Ollama, checked by llama.cpp")
    p.add_argument("target", help="run folder (an adapter is merged first), merged model folder, 'builtin' or model folder")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the file to write")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0"], help="tensor type (default f16)")
    p.add_argument("--quantize", nargs="+", metavar="QUANT", help="also K-quants by llama.cpp, e.g. Q4_K_M (needs orpo[serve] or llama-quantize)")
    p.add_argument("--modelfile", action="store_true", help="also write an Ollama Modelfile beside the GGUF")
    p.add_argument("--force", action="store_true", help="replace outputs that exist")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run (never taken from a folder's config)")
    p.set_defaults(func=cmd_export)
    p = command("serve", "an OpenAI-compatible server for a run, model or GGUF: llama.cpp (CPU) or vLLM (CUDA)")
    p.add_argument("target", help="run folder, merged model folder, model folder, 'builtin' or a .gguf file")
    p.add_argument("--engine", choices=["llama-cpp", "vllm"], help="default: vllm with CUDA, else llama-cpp")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require this key from clients (set it whenever --host is not loopback)")
    p.add_argument("--print", action="store_true", help="print the engine's command instead of running it")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run (never taken from a folder's config)")
    p.set_defaults(func=cmd_serve)
    p = command("compare", "runs side by side: config keys that differ, held-out metrics, overlaid curves (one HTML page)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (e.g. runs/*)")
    p.add_argument("--out", default="compare.html", help="the page to write (default compare.html)")
    p.set_defaults(func=cmd_compare)
    p = command("report", "rebuild a run's report.html and plots/*.png")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    p = command("data", "data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("inspect", help="the data doctor: counts, drops, token lengths, pitfalls, rendered examples",
                            epilog=EXIT_CODES, parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="*", help="[CONFIG.yaml] [key=value ...] (the training config)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_data_inspect)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Options anywhere: key=value items after an option (`orpo eval RUN --data F key=value`) join the command's
    items; anything else left over is a usage error (exit 2)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "items")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.items = [*args.items, *extra]
    args.verbose = getattr(args, "verbose", False)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    quiet = not is_main_process() and not args.verbose  # other ranks: warnings and errors only
    if quiet:
        import datasets

        datasets.disable_progress_bars()
    level = logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)  # also when logging was set up before (main called twice in one process)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns at import on CPU-only machines about an optional kernels package; not actionable.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # huggingface_hub logs every retry of a failed download ("Retrying in 8s"), through its own handler and ours:
    # with no network that is dozens of lines before orpo's one (HubError); -v shows them.
    if not args.verbose:
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    # transformers' own deprecation notices (triggered inside peft/transformers, not by user code).
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"orpo: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError, HubError) as exc:
        print(f"orpo: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
