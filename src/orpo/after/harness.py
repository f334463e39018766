"""lm-evaluation-harness tasks on an already-loaded model (`orpo eval --lm-eval TASKS`), chat template applied.

Optional: `pip install 'orpo[eval]'` (lm-eval). Tasks are the harness's own names, or YAML task files in
`include_path` (local data works offline). Imported lazily, so orpo runs without it.
"""

from __future__ import annotations


def run_tasks(model, tokenizer, tasks: list[str], *, include_path: str | None = None, limit: int | None = None,
              batch_size: int = 8) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm_eval.simple_evaluate, prompts rendered with the tokenizer's chat template."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("--lm-eval needs lm-evaluation-harness: pip install 'orpo[eval]' (or pip install lm-eval)") from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    result = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=TaskManager(include_path=include_path), apply_chat_template=True, limit=limit,
    )
    return {
        task: {k.split(",")[0]: v for k, v in values.items() if isinstance(v, float) and "stderr" not in k}
        for task, values in result["results"].items()
    }
