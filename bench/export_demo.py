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
    from orpo.after.export import export_gguf, llama_cpp_agreement, source_model

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
        quant = ["Q4_K_M"] if kind == "f16" else []
        result = export_gguf(args.run, out / f"model.{kind}.gguf", kind, quant, with_modelfile=kind == "q8_0", force=True)
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        result["llama_cpp_agreement"], result["same_ids"] = llama_cpp_agreement(out / f"model.{kind}.gguf", model, tokenizer, prompts)
        rows.append(result)
        if quant:
            q = out / "model.f16.Q4_K_M.gguf"
            agreement, same = llama_cpp_agreement(q, model, tokenizer, prompts)
            rows.append({"type": "Q4_K_M (llama.cpp, from f16)", "size_bytes": q.stat().st_size, "llama_cpp_agreement": agreement, "same_ids": same})
    lines = ["| type | size | written in | read-back max abs logit diff (of max logit) | llama.cpp next-token agreement | same token ids |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        check = r.get("check")
        diff = f"{check['max_abs_diff']:.2e} ({check['scale']:.1f})" if check else "n/a (llama.cpp's quantizer)"
        lines.append(f"| {r['type']} | {r['size_bytes'] / 2**20:.1f} MiB | {r.get('seconds', '-')} s | {diff} | "
                     f"{100 * r['llama_cpp_agreement']:.1f}% | {'yes' if r['same_ids'] else 'NO'} |")
    table = "\n".join(lines)
    print(f"\n{args.run}, {sum(len(i) for i in prompts)} held-out prompt messages, {len(prompts)} prompts\n\n{table}")
    (out / "export.json").write_text(json.dumps({"run": args.run, "rows": rows, "table": table}, indent=2, default=str))
    for p in out.glob("*.gguf"):  # the figures are the point; the files are large
        p.unlink()


if __name__ == "__main__":
    main()
