"""The changes to the model's own code that exist only for speed: the packed layout's attention, LoRA layers
with their dropout as one function each, gated MLPs and RMSNorms with closed-form backwards. Each is checked
against the unchanged model in its test; `model.fuse=false` (or an engine that shards weights) turns them off.

May import: orpo.config, orpo.files, orpo.data, and each other.
"""
