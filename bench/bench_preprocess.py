"""Preprocessing speed: orpo's pipeline vs TRL 1.16's ORPO preprocessing, same pairs, same tokenizer, same run.

    python bench/bench_preprocess.py [--pairs 40000] [--num-proc 1]

Pairs are synthetic conversational rows (system + user prompt, assistant chosen/rejected), tokenized with the
embedded SmolLM2 tokenizer (ChatML). orpo: canonical rows -> data.tokenize_rows (batched datasets.map, no cache)
-> data.finish. TRL: the three maps ORPOTrainer.__init__ runs (maybe_extract_prompt, maybe_apply_chat_template,
tokenize_row), with tokenize_row bound to a stand-in trainer (building a real one needs a model). Prints pairs/s
of each and the ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import time
import types
import warnings

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the a of to and in is it that for on with as was by at be this have from or one had not but what all "
         "were when we there can an your which their said if do will each about how up out them then she many some so "
         "these would other into has more her two like him see time could no make than first been its who now people "
         "my made over did down only way find use may water long little very after words called just where most know "
         "paris answer number sea question colour green blue white seven twelve because therefore example").split()


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    return [
        {
            "prompt": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": text(10, 80)}],
            "chosen": [{"role": "assistant", "content": text(10, 120)}],
            "rejected": [{"role": "assistant", "content": text(10, 120)}],
        }
        for _ in range(n)
    ]


def run_orpo(rows, tokenizer, num_proc: int, max_length: int, max_prompt_length: int) -> float:
    import datasets

    from orpo.config import load_config
    from orpo.data.pairs import DataReport, finish, token_spec, tokenize_rows

    config = load_config(None, [f"max_length={max_length}", f"max_prompt_length={max_prompt_length}"])
    dataset = datasets.Dataset.from_list(rows)
    start = time.perf_counter()
    tokenized = tokenize_rows(dataset, tokenizer, token_spec(tokenizer, config), num_proc, None, "bench")
    kept = finish(tokenized, DataReport(), "bench")
    elapsed = time.perf_counter() - start
    assert len(kept) == len(rows)
    return elapsed


def run_trl(rows, tokenizer, num_proc: int, max_length: int) -> float:
    import datasets
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt
    from trl.experimental.orpo import ORPOTrainer

    stand_in = types.SimpleNamespace(processing_class=tokenizer, is_encoder_decoder=False, max_length=max_length)
    stand_in.build_tokenized_answer = types.MethodType(ORPOTrainer.build_tokenized_answer, stand_in)
    tokenize_row = types.MethodType(ORPOTrainer.tokenize_row, stand_in)
    dataset = datasets.Dataset.from_list(rows)
    start = time.perf_counter()
    dataset = dataset.map(maybe_extract_prompt, num_proc=num_proc)
    dataset = dataset.map(maybe_apply_chat_template, fn_kwargs={"processing_class": tokenizer}, num_proc=num_proc)
    dataset = dataset.map(tokenize_row, num_proc=num_proc)
    elapsed = time.perf_counter() - start
    assert len(dataset) == len(rows)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=40_000)
    parser.add_argument("--num-proc", type=int, default=1, help="datasets.map workers for both pipelines")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-prompt-length", type=int, default=512)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import datasets
    from transformers import AutoTokenizer

    from orpo.model.builtin import builtin_model_dir

    datasets.disable_progress_bars()
    datasets.disable_caching()  # both sides tokenize from scratch
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    rows = synthetic_pairs(args.pairs)
    num_proc = args.num_proc if args.num_proc > 1 else None
    ours = run_orpo(rows, tokenizer, num_proc, args.max_length, args.max_prompt_length)
    trl = run_trl(rows, tokenizer, num_proc, args.max_length)
    print(f"pairs: {args.pairs}, tokenizer: SmolLM2-135M-Instruct, num_proc: {args.num_proc}")
    print(f"orpo: {ours:8.1f} s  {args.pairs / ours:9.0f} pairs/s")
    print(f"TRL : {trl:8.1f} s  {args.pairs / trl:9.0f} pairs/s")
    print(f"ratio orpo/TRL pairs/s: {trl / ours:.2f}x")


if __name__ == "__main__":
    main()
