"""Where a training step's time goes: one scenario of bench_train.py, one system, under torch.profiler.

    python bench/profile_step.py [--scenario A] [--system orpo-packed] [--steps 2]

Runs the scenario's pairs through the system's real training loop (as bench_train.py does) for `--steps`
optimizer steps, all profiled (model loading is not), and prints the operators by self CPU time, the time
by kind of work (matmuls, attention, LoRA dropout, softmax, elementwise, optimizer) and the peak RSS.
"""

from __future__ import annotations

import argparse
import collections
import resource
import tempfile
from pathlib import Path

import bench_train as bt

KINDS = [  # (kind, operator name fragments), first match wins
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("dropout RNG and masks", ("bernoulli", "dropout")),
    ("matmuls", ("aten::mm", "aten::addmm", "aten::bmm")),
    ("softmax / logsumexp", ("logsumexp", "softmax", "aten::exp")),
    ("optimizer", ("adam", "_foreach", "lerp", "addcdiv", "addcmul", "sqrt")),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="A")
    ap.add_argument("--system", default="orpo-packed", choices=bt.SYSTEMS)
    ap.add_argument("--steps", type=int, default=2)
    a = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(2)
    s = bt.SCENARIOS[a.scenario]
    cache = Path(tempfile.gettempdir()) / "orpo-bench"
    cache.mkdir(parents=True, exist_ok=True)
    n = a.steps * s.batch * s.ga
    pairs = bt.hh_rlhf_pairs(s, n) if s.data == "hh-rlhf" else bt.random_pairs(s, n, 49_152 if s.model == "smollm2" else 128_256, seed=1)
    source = bt.model_source(s, cache)
    prof = profile(activities=[ProfilerActivity.CPU])
    import orpo.training.loop as loop

    if a.system == "trl":
        import transformers

        real_train = transformers.Trainer.train

        def profiled_train(self, *args, **kwargs):
            with prof:
                return real_train(self, *args, **kwargs)

        transformers.Trainer.train = profiled_train
    else:
        real_loop = loop.micro_batch_stream

        def profiled_stream(*args, **kwargs):  # the first micro-batch is read when the step loop starts
            prof.start()
            yield from real_loop(*args, **kwargs)

        loop.micro_batch_stream = profiled_stream
    with tempfile.TemporaryDirectory() as tmp:
        if a.system == "trl":
            bt.trl_worker(s, source, pairs, a.steps, Path(tmp))
        else:
            bt.orpo_worker(s, a.system.removeprefix("orpo-"), source, pairs, a.steps, Path(tmp))
            prof.stop()  # after the loop, the final save and the report (small next to the steps)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=20))
    total = sum(e.self_cpu_time_total for e in events)
    by_kind = collections.Counter()
    for e in events:
        kind = next((k for k, frags in KINDS if any(f in e.key for f in frags)), "other (elementwise, copies, ...)")
        by_kind[kind] += e.self_cpu_time_total
    print(f"\n{a.system} {a.scenario}: {a.steps} steps, self CPU time by kind of work")
    for kind, t in by_kind.most_common():
        print(f"  {kind:34s} {t / 1e6:8.2f} s  {100 * t / total:5.1f}%")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
