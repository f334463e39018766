"""lm-evaluation-harness tasks on an already-loaded model (`orpo eval --lm-eval TASKS`), chat template applied.

Optional: `pip install 'orpo[eval]'` (lm-eval). Tasks are the harness's own names, a preset (PRESETS: `nous`), or
YAML task files in `include_path` (local data works offline). Imported lazily, so orpo runs without it.

`nous` is the suite the seed's tutorial (and Nous Research's model cards) report: AGIEval, GPT4All, TruthfulQA
and Bigbench, here as lm-evaluation-harness 0.4 task names. Each group's score is the mean over its tasks of one
metric per task (SCORE_METRICS: the first the task reports), and `average` is the mean of the groups' scores.
The datasets come from the Hub on first use.
"""

from __future__ import annotations

from collections.abc import Mapping

PRESETS: dict[str, dict[str, list[str]]] = {
    "nous": {
        "AGIEval": ["agieval_aqua_rat", "agieval_logiqa_en", "agieval_lsat_ar", "agieval_lsat_lr", "agieval_lsat_rc",
                    "agieval_sat_en", "agieval_sat_en_without_passage", "agieval_sat_math"],
        "GPT4All": ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande"],
        "TruthfulQA": ["truthfulqa_mc2"],
        "Bigbench": [f"bigbench_{name}_multiple_choice" for name in (
            "causal_judgment", "date_understanding", "disambiguation_qa", "geometric_shapes", "logical_deduction",
            "movie_recommendation", "navigate", "reasoning_about_colored_objects", "ruin_names",
            "salient_translation_error_detection", "snarks", "sports_understanding", "temporal_sequences",
            "tracking_shuffled_objects")],
    },
}
SCORE_METRICS = ("acc_norm", "acc", "mc2", "exact_match")  # a task's score for its group: the first it reports


def expand(names: list[str], presets: Mapping[str, dict[str, list[str]]] | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """(task names in order, {group: its tasks}) for a mix of task names and preset names."""
    presets = PRESETS if presets is None else presets
    tasks: list[str] = []
    groups: dict[str, list[str]] = {}
    for name in names:
        for group, members in presets.get(name, {name: [name]}).items():
            if name in presets:
                groups[group] = members
            tasks += [t for t in members if t not in tasks]
    return tasks, groups


def run_tasks(model, tokenizer, tasks: list[str], *, include_path: str | None = None, limit: int | None = None,
              batch_size: int = 8) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm_eval.simple_evaluate, prompts rendered with the tokenizer's chat template
    (when it has one); preset names are expanded, and each preset group adds {group: {"score": mean}} and
    "average"."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("--lm-eval needs lm-evaluation-harness: pip install 'orpo[eval]' (or pip install lm-eval)") from None
    names, groups = expand(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    result = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=TaskManager(include_path=include_path),
        apply_chat_template=bool(getattr(tokenizer, "chat_template", None)), limit=limit,
    )
    out = {
        task: {k.split(",")[0]: v for k, v in values.items() if isinstance(v, float) and "stderr" not in k}
        for task, values in result["results"].items()
    }
    return out | group_scores(out, groups)


def group_scores(results: dict[str, dict[str, float]], groups: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """{group: {"score": mean of its tasks' scores}} plus {"average": {"score": mean of the groups}}."""
    scores = {}
    for group, members in groups.items():
        values = [next(r[m] for m in SCORE_METRICS if m in r) for t in members
                  if (r := results.get(t)) and any(m in r for m in SCORE_METRICS)]
        if values:
            scores[group] = {"score": sum(values) / len(values)}
    if len(scores) > 1:
        scores["average"] = {"score": sum(s["score"] for s in scores.values()) / len(scores)}
    return scores
