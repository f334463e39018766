"""Stage 3, training: the layout (a step's pairs -> forward passes), log-probs (where a batch meets the model),
the pure ORPO loss, optimizer, engine (processes), checkpoints, tracking, held-out metrics and the loop.

May import: orpo.config, orpo.files, orpo.data, orpo.model.
"""
