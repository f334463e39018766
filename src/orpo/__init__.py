"""orpo: ORPO fine-tuning (Hong, Lee & Thorne 2024), from the command line (`orpo train`) or from Python:

    import orpo
    run = orpo.train("my.yaml", learning_rate=1e-5)       # or orpo.train() for the embedded demo
    run.evaluate(); run.merge("merged"); run.export("model.gguf")
    orpo.sweep("my.yaml", search={"beta": [0.1, 0.5]})    # settings chosen on validation data (orpo sweep)
    orpo.plan("my.yaml", gpus=["L4"])                     # will it fit? memory by part and time, before it runs

    from orpo import ORPOConfig, ORPOTrainer, setup_chat_format   # TRL's names, for code written against TRL

The public names load lazily (torch and transformers are imported on first use, so `import orpo` and the CLI's
--help stay instant): api.py holds the functions behind the commands and `Run`, trainer.py TRL's names.

The package, one folder per stage in the order data flows: data/ (rows -> token ids) -> model/ (tokenizer,
model, LoRA) -> training/ (the loop) -> after/ (eval, report, card, merge, push, chat, export, serve) -> search/
(orpo sweep: settings chosen on validation data). A module
imports from its own stage and earlier ones only; config.py, trl_names.py, files.py and hub_errors.py serve every
stage, and api.py, trainer.py and cli.py (the command line, a thin layer over api.py) call into all of them.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module (under orpo) that defines it
_EXPORTS = {
    "train": "api", "load_run": "api", "Run": "api", "evaluate": "api", "merge": "api", "export": "api", "push": "api",
    "chat": "api", "report": "api", "compare": "api", "inspect_data": "api", "sweep": "api", "plan": "api", "CheckFailed": "api", "Merged": "api",
    "ORPOConfig": "trainer", "ORPOTrainer": "trainer", "setup_chat_format": "trainer",
    "Config": "config", "make_config": "config", "ConfigError": "config", "DataError": "data.formats",
    "HubError": "hub_errors", "NonFiniteError": "training.checkpoint", "builtin_model_dir": "model.builtin",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'orpo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
