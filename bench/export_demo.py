"""The README's export table, and the figures the check's limits come from: each run or model given is exported
to every GGUF type orpo writes and to llama.cpp's K-quants (made from f16), and each file is checked by
llama.cpp (gguf_check: next-token KL and top-1 against the fp32 source model, tensors read back, metadata).

    .venv/bin/python bench/export_demo.py RUN_OR_MODEL [RUN_OR_MODEL ...] [--out DIR] [--quantize Q4_K_M ...]

Prints one markdown table (a row per source and type: size, time, mean KL, worst prompt, top-1, its margin to
the limits, peak RSS of the process so far) and writes it with the raw figures to DIR/export.json
(default bench/results/export). The files are deleted: the figures are the point."""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def main() -> None:
    from orpo.after import gguf_check
    from orpo.after.export import CheckFailed, export_gguf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+")
    parser.add_argument("--out", default="bench/results/export")
    parser.add_argument("--types", nargs="+", default=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--quantize", nargs="*", default=["Q6_K", "Q5_K_M", "Q4_K_M"])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for source in args.sources:
        for kind in args.types:
            started = time.perf_counter()
            quantize = args.quantize if kind == "f16" else []
            try:
                result = export_gguf(source, out / f"model.{kind}.gguf", kind, quantize, force=True)
            except CheckFailed as failed:
                result = failed.result
            wall = round(time.perf_counter() - started, 1)
            for label, entry in result["files"].items():
                rows.append({"source": source, "type": label, "wall_seconds": wall, **entry,
                             "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024})
            for p in out.glob("*.gguf"):
                p.unlink()
    lines = ["| source | type | size | mean KL (limit) | worst prompt (limit) | top-1 (limit) | tensors | passed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["check"]
        kl, worst, top1 = gguf_check.limits(r["type"])
        lines.append(f"| {r['source']} | {r['type']} | {r['size_bytes'] / 2**20:.1f} MiB | {c['kl_mean']:.2e} ({kl:g}) | "
                     f"{c['kl_worst_prompt']:.2e} ({worst:g}) | {100 * c['top1']:.1f}% ({100 * top1:g}%) | {c['tensor_error']:.1e} | "
                     f"{'yes' if c['passed'] else 'NO'} |")
    table = "\n".join(lines)
    print(f"\n{table}")
    (out / "export.json").write_text(json.dumps({"rows": rows, "table": table}, indent=2, default=str))


if __name__ == "__main__":
    main()
