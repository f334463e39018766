"""The README's export table: a run (default: the demo's, runs/orpo) exported to every GGUF type orpo writes and
to llama.cpp's Q4_K_M, with the time, the size, the read-back check and llama.cpp's next-token agreement with
the merged source model on the run's held-out prompts (llama-cpp-python, installed by ./run.sh).

    ./run.sh demo && .venv/bin/python bench/export_demo.py [RUN] [--out DIR]

Prints a markdown table and writes it with the raw figures to DIR/export.json (default bench/results/export)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    from orpo.after.export import check_gguf, export_gguf, llama_cpp_agreement, quantize, source_model
    from orpo.data.pairs import prompt_ids

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/orpo")
    parser.add_argument("--out", default="bench/results/export")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, prompts = source_model(args.run)
    rows = []
    for kind in ("f32", "f16", "bf16", "q8_0"):
        started = time.perf_counter()
        result = export_gguf(args.run, out / f"model.{kind}.gguf", kind, with_modelfile=kind == "q8_0", force=True)
        result["wall_seconds"] = round(time.perf_counter() - started, 1)  # merge + write + read-back check
        result["llama_cpp_agreement"], result["same_ids"] = llama_cpp_agreement(out / f"model.{kind}.gguf", model, tokenizer, prompts)
        rows.append(result)
        if kind == "f16":
            q = out / "model.Q4_K_M.gguf"
            started = time.perf_counter()
            quantize(out / "model.f16.gguf", q, "Q4_K_M")
            seconds = round(time.perf_counter() - started, 1)
            agreement, same = llama_cpp_agreement(q, model, tokenizer, prompts)
            check = check_gguf(q, model, tokenizer, prompts, "q8_0")  # its difference (no Q4_K_M tolerance is claimed)
            rows.append({"type": "Q4_K_M (llama.cpp's quantizer, from f16)", "size_bytes": q.stat().st_size, "seconds": seconds,
                         "wall_seconds": seconds, "check": check.__dict__, "llama_cpp_agreement": agreement, "same_ids": same})
    lines = ["| type | size | file written in | whole export (merge, write, check) | read-back max abs logit diff (max logit) | "
             "llama.cpp next-token agreement | same token ids |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        check = r["check"]
        diff = f"{check['max_abs_diff']:.2e} ({check['scale']:.1f})"
        lines.append(f"| {r['type']} | {r['size_bytes'] / 2**20:.1f} MiB | {r['seconds']} s | {r['wall_seconds']} s | {diff} | "
                     f"{100 * r['llama_cpp_agreement']:.1f}% | {'yes' if r['same_ids'] else 'NO'} |")
    table = "\n".join(lines)
    positions = sum(len(ids) for ids in prompt_ids(tokenizer, prompts))
    print(f"\n{args.run}: {len(prompts)} held-out prompts, {positions} positions\n\n{table}")
    (out / "export.json").write_text(json.dumps({"run": args.run, "rows": rows, "table": table}, indent=2, default=str))
    for p in out.glob("*.gguf"):  # the figures are the point; the files are large
        p.unlink()


if __name__ == "__main__":
    main()
