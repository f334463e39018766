"""The changes to the model's own code that exist only for speed: the packed layout's attention (its mask in
the kernel's form, and split_attention on a CPU), LoRA's dropout with bit masks, a LoRA layer as one function,
gated MLPs that recompute their activation, and RMSNorm with a closed-form backward. Each is checked against the
code it replaces in its test. model.load.load_model swaps the layers in unless told not to (`fuse=False`, which
the loop passes under ZeRO-3: engine.fusable); the attention serves `layout: packed`.

May import: orpo.config, orpo.files, orpo.data, and each other.
"""
