"""Command line: `orpo train [CONFIG.yaml] [key=value ...]`, `orpo config`, `orpo eval/merge/push/chat/report`.
Parsing only; no logic."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

# MKL may otherwise use fewer threads than asked when the cores are busy, which changes the order of float sums:
# a seeded run must give the same numbers whatever else the machine is doing. Set before torch loads MKL.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

from .config import DEMO, ConfigError, describe_keys, load_config  # noqa: E402


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """The first item is a config file unless it looks like key=value."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def is_main_process() -> bool:
    """False in the processes of a distributed launch other than its first (RANK set by torchrun/accelerate)."""
    return os.environ.get("RANK", "0") == "0"


def cmd_train(args) -> int:
    path, overrides = _split_args(args.items)
    config = load_config(path, overrides, preset=DEMO if path is None else None)  # no file: the embedded demo
    from .train import train

    summary = train(config)
    if not is_main_process():  # under torchrun / accelerate launch, rank 0 alone prints
        return 0
    if "after" in summary:
        from .assess import table

        print("\n" + table(["before", "after"], [summary.get("before", {}), summary["after"]]))
    print(f"\nrun folder: {config.output_dir}  (summary.json, metrics.jsonl, final/)")
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
    from .assess import run_eval

    harness = dict(tasks=args.lm_eval.split(","), include_path=args.lm_eval_include, limit=args.lm_eval_limit) if args.lm_eval else None
    return run_eval(args.target, [*args.items, *_remote_code(args)], args.data, args.compare, args.samples, not args.no_generate, args.json, harness)


def cmd_merge(args) -> int:
    from .merge import run_merge

    return run_merge(args.run_dir, args.dtype, args.out, args.max_shard_size, _remote_code(args))


def cmd_push(args) -> int:
    from .upload import run_push

    return run_push(args.folder, args.repo, args.private, args.dry_run)


def cmd_chat(args) -> int:
    from .chat import run_chat

    return run_chat(args.target, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.system, args.seed,
                    _remote_code(args))


def cmd_report(args) -> int:
    from .report import run_report

    return run_report(args.run_dir)


def cmd_data_inspect(args) -> int:
    path, overrides = _split_args(args.items)
    config = load_config(path, overrides)
    from .inspect_data import run_inspect

    return run_inspect(config, args.json)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orpo", description="ORPO fine-tuning of language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune with ORPO (no config file: the embedded demo's preset)")
    p.add_argument("items", nargs="*", help="[CONFIG.yaml] [key=value ...] (see `orpo config`)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("config", help="list every config key with its default and description")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("eval", help="held-out preference (and task) metrics of a run, merged or base model")
    p.add_argument("target", help="run folder, merged model folder, 'builtin', Hub id or model folder")
    p.add_argument("items", nargs="*", help="key=value config overrides (data.*, beta, per_device_eval_batch_size, ...)")
    p.add_argument("--data", help="preference data to evaluate on (sets data.path)")
    p.add_argument("--compare", metavar="OTHER", help="a second model, shown in the first column (e.g. builtin: the base)")
    p.add_argument("--samples", type=int, default=4, help="generation samples to show (default 4)")
    p.add_argument("--no-generate", action="store_true", help="skip generation (task accuracy and samples)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--lm-eval", metavar="TASKS", help="also run lm-evaluation-harness tasks (comma-separated; needs orpo[eval])")
    p.add_argument("--lm-eval-include", metavar="DIR", help="folder of extra lm-eval task YAML files")
    p.add_argument("--lm-eval-limit", type=int, help="at most this many documents per lm-eval task")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run (never taken from a folder's config)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("merge", help="merge a run's LoRA adapter into its base, save and verify the logits")
    p.add_argument("run_dir")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--out", required=True, help="folder for the merged model (replaced if it exists)")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run (never taken from a folder's config)")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("push", help="upload a run's adapter or a merged model with a model card to the Hub")
    p.add_argument("folder", help="run folder or merged model folder")
    p.add_argument("--repo", required=True, help="Hub repository, user/name")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", metavar="FOLDER", help="write what would be uploaded into FOLDER; no network")
    p.set_defaults(func=cmd_push)
    p = sub.add_parser("chat", help="chat with a run, merged or base model (tokens streamed)")
    p.add_argument("target", help="run folder, merged model folder, 'builtin', Hub id or model folder")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run (never taken from a folder's config)")
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("report", help="rebuild a run's report.html and plots/*.png")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("inspect", help="the data doctor: counts, drops, token lengths, pitfalls, rendered examples")
    p.add_argument("items", nargs="*", help="[CONFIG.yaml] [key=value ...] (the training config)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_data_inspect)
    args = parser.parse_args(argv)
    quiet = not is_main_process() and not args.verbose  # other ranks: warnings and errors only
    if quiet:
        import datasets

        datasets.disable_progress_bars()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns at import on CPU-only machines about an optional kernels package; not actionable.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # transformers' own deprecation notices (triggered inside peft/transformers, not by user code).
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"orpo: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError) as exc:
        print(f"orpo: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
