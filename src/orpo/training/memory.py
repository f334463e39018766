"""The memory model: bytes of each part of a training process, from the model's shape and the run's settings.

Nothing here loads a model. Every figure is a count: parameters from the architecture (`Arch`, read from a
transformers config), bytes per parameter from the dtype or quantization, and the tensors autograd keeps for
the backward pass from what orpo's own layers save (model/fast/, training/logps.py) and what the stock
transformers + peft layers save (the TRL side, and orpo with its fused layers off).

Activations are counted per forward pass (`Pass`: rows x length tokens and the pairs laid in them), in bytes
per token of the pass and per decoder layer, written as coefficients of the hidden size H and the MLP size I:

    orpo, LoRA          2H (the two norms' inputs, residual dtype) + H + 2I (o_proj's input, gate and up)
    orpo, full          2H (residual) + 3H + 3I (every projection's input, gate and up)
    stock (peft), LoRA  14H + 5I (unfused norms, each LoRA layer's dropout output and mask, activations)
    stock, full         6H + 4I

plus attention (queries, keys, values, output and the softmax statistics; eager attention keeps the whole
probability matrix) and LoRA's rank-r intermediates. The coefficients were counted with a saved-tensor hook on
the real layers (tests/test_memory.py checks them the same way). With gradient checkpointing a layer keeps only
its input (H in the residual dtype) and one layer's activations are rebuilt at a time in the backward.

The output layer: orpo's packed layout keeps d log p / d h (N x H) and a chunk of logits (chunk x vocabulary); the
plain layout and TRL keep the full logits and their log-softmax (rows x length x vocabulary), which dominate
for a 128k vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30
NF4_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights
NF4_DQ_BLOCK = 256  # double quantization: the absmaxes are 8-bit, one fp32 constant per 256 of them
ADAM8_BLOCK = 256  # bitsandbytes 8-bit optimizers: blockwise quantized states, one fp32 absmax per 256
ADAM8_MIN = 4096  # tensors smaller than this keep 32-bit states in bitsandbytes' 8-bit optimizers
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Per decoder layer and token, activations kept for the backward, in units of the hidden size H and MLP size I
# (residual-dtype H, linear-dtype H, linear-dtype I); attention and LoRA's rank terms are added separately.
LAYER_COEFFICIENTS = {
    ("orpo", True): (2, 1, 2),
    ("orpo", False): (2, 3, 3),
    ("stock", True): (2, 12, 5),
    ("stock", False): (2, 4, 4),
}
LORA_INTERMEDIATES = 7  # one (tokens, r) product per adapted projection of a layer
# A layer's backward briefly holds the gradients of its activations: in units of H and I per token.
BACKWARD_TRANSIENT = (4, 3)


@dataclass(frozen=True)
class Arch:
    """The shape of a decoder-only transformer, as the memory model needs it."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int  # MLP width (per expert for a mixture of experts)
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: int = 1  # experts per layer (1: dense)
    experts_per_token: int = 1
    attention_bias: bool = False

    @classmethod
    def from_config(cls, config) -> Arch:
        """From a transformers config (or its text part for a multimodal one); ValueError when it is not a
        decoder the model covers."""
        config = getattr(config, "text_config", None) or config
        get = lambda *names, default=None: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)  # noqa: E731
        hidden, layers, heads = get("hidden_size", "n_embd", "d_model"), get("num_hidden_layers", "n_layer"), get("num_attention_heads", "n_head")
        vocab = get("vocab_size")
        if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads, vocab)):
            raise ValueError(f"model type '{getattr(config, 'model_type', '?')}': no hidden_size / num_hidden_layers / "
                             "num_attention_heads / vocab_size in its config: not a decoder orpo plan can size")
        experts = get("num_local_experts", "num_experts", "n_routed_experts", default=1)
        inter = get("moe_intermediate_size", default=None) if experts > 1 else None
        return cls(
            model_type=getattr(config, "model_type", "?"),
            layers=layers,
            hidden=hidden,
            intermediate=inter or get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
            heads=heads,
            kv_heads=get("num_key_value_heads", default=heads),
            head_dim=get("head_dim", default=hidden // heads),
            vocab=vocab,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            experts=experts,
            experts_per_token=get("num_experts_per_tok", "num_experts_per_token", default=1) if experts > 1 else 1,
            attention_bias=bool(getattr(config, "attention_bias", False)),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int, int]]:
        """{projection: (in, out, copies per layer)}; the MLP's copies are its experts."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i, e = self.hidden, self.intermediate, self.experts
        return {"q_proj": (h, q, 1), "k_proj": (h, kv, 1), "v_proj": (h, kv, 1), "o_proj": (q, h, 1),
                "gate_proj": (h, i, e), "up_proj": (h, i, e), "down_proj": (i, h, e)}

    def layer_linear_params(self) -> int:
        """Parameters of one layer's projections (biases included when the attention has them)."""
        total = sum(a * b * n for a, b, n in self.linear_shapes().values())
        if self.attention_bias:
            total += (self.heads + 2 * self.kv_heads) * self.head_dim
        if self.experts > 1:
            total += self.hidden * self.experts  # the router
        return total

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """The output layer's own parameters (0 when tied to the input embeddings)."""
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_linear_params() + self.embedding_params + self.head_params + self.norm_params


@dataclass(frozen=True)
class Setup:
    """The run's settings that decide memory, resolved for one device."""

    lora: bool = True
    r: int = 16
    targets: tuple[str, ...] = LINEARS
    dropout: float = 0.05
    new_tokens: int = 0  # ChatML rows trained in the embeddings (and an untied head)
    weight_bytes: int = 4  # the unquantized weights' dtype
    load_in_4bit: bool = False
    double_quant: bool = True
    residual_bytes: int = 4  # the hidden states between layers
    linear_bytes: int = 4  # the projections' outputs (the autocast dtype under mixed precision)
    gradient_checkpointing: bool = False
    optim: str = "adamw_torch"
    layout: str = "packed"
    kernel: str = "sdpa"  # sdpa, eager, flash_attention_2, flex_attention, or orpo_split_sdpa (CPU, packed)
    chunk: int = 1 << 14  # tokens per output-layer chunk (packed)
    nll_on_prompt: bool = True
    code: str = "orpo"  # "orpo" (fused layers) or "stock" (transformers + peft as they are: TRL)


@dataclass(frozen=True)
class Pass:
    """One forward pass: rows x length tokens, and the (prompt, chosen, rejected) lengths of its pairs."""

    rows: int
    length: int
    pairs: tuple[tuple[int, int, int], ...]
    packed: bool
    padded: bool = True  # plain: rows of different lengths (a padding mask goes to the attention)

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    @property
    def scored(self) -> int:
        """Tokens whose log-prob goes through the output layer (packed: the response tokens, and the prompt's once)."""
        if not self.packed:
            return self.rows * (self.length - 1)
        return sum(c + n + max(p - 1, 0) for p, c, n in self.pairs)


@dataclass
class Parts:
    """Bytes of each part of a process's peak (see `peak`), and what they were computed from."""

    runtime: int = 0
    weights: int = 0
    lora: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    output_layer: int = 0
    transient: int = 0
    heap: int = 0  # CPU only: what glibc's heap keeps of freed activations (see peak)
    notes: list[str] = field(default_factory=list)

    PARTS = ("runtime", "weights", "lora", "gradients", "optimizer", "activations", "output_layer", "transient", "heap")

    @property
    def total(self) -> int:
        return sum(getattr(self, p) for p in self.PARTS)

    def as_dict(self) -> dict[str, int]:
        return {p: getattr(self, p) for p in self.PARTS} | {"total": self.total}


def targeted(arch: Arch, setup: Setup) -> dict[str, tuple[int, int, int]]:
    """The projections that get LoRA adapters."""
    return {k: v for k, v in arch.linear_shapes().items() if k in setup.targets}


def lora_tensors(arch: Arch, setup: Setup) -> list[int]:
    """Element counts of every trainable LoRA tensor (A and B of each adapted projection, the ChatML rows)."""
    sizes = []
    for a, b, n in targeted(arch, setup).values():
        sizes += [setup.r * a, b * setup.r] * n * arch.layers
    if setup.new_tokens:
        sizes += [setup.new_tokens * arch.hidden] * (1 if arch.tied else 2)
    return sizes


def trainable_tensors(arch: Arch, setup: Setup) -> list[int]:
    """Element counts of the trained tensors: LoRA's, or every weight in full fine-tuning."""
    if setup.lora:
        return lora_tensors(arch, setup)
    per_layer = [a * b for a, b, n in arch.linear_shapes().values() for _ in range(n)] + [arch.hidden] * 2
    sizes = per_layer * arch.layers + [arch.embedding_params, arch.hidden]
    return sizes + ([arch.head_params] if arch.head_params else [])


def weight_bytes(arch: Arch, setup: Setup) -> tuple[int, list[str]]:
    """Bytes of the base weights. 4-bit: the projections in NF4 (0.5 byte each, plus one absmax per 64, itself
    8-bit with an fp32 per 256 under double quantization); embeddings, output layer and norms stay unquantized
    and peft's prepare_model_for_kbit_training (orpo and TRL both call it) makes them fp32."""
    if not setup.load_in_4bit:
        return arch.params * setup.weight_bytes, []
    linear = arch.layers * arch.layer_linear_params()
    blocks = linear / NF4_BLOCK
    constants = blocks * (1 + 4 / NF4_DQ_BLOCK) if setup.double_quant else blocks * 4
    rest = arch.params - linear
    note = (f"4-bit: {linear / 1e9:.2f}B projection weights at {(linear / 2 + constants) / linear:.3f} bytes each; "
            f"{rest / 1e9:.2f}B embedding, output-layer and norm weights in fp32 (prepare_model_for_kbit_training)")
    return int(linear / 2 + constants + rest * 4), [note]


def optimizer_bytes(sizes: list[int], dtype_bytes: int, optim: str) -> int:
    """AdamW's two states per trained value: the parameter's dtype (torch), or 8-bit blockwise (bitsandbytes;
    tensors under 4,096 values keep fp32 states; each 8-bit state has its own 256-value fp32 code book). Paged
    states live in CUDA unified memory: counted here, as they are while on the GPU."""
    if optim in ("adamw_torch", "adamw_torch_fused"):
        return 2 * sum(sizes) * dtype_bytes
    small = sum(s for s in sizes if s < ADAM8_MIN)
    large = [s for s in sizes if s >= ADAM8_MIN]
    blocks = sum(-(-s // ADAM8_BLOCK) for s in large)
    return 2 * (sum(large) + 4 * blocks + 256 * 4 * len(large) + small * 4)


def attention_bytes(arch: Arch, setup: Setup, p: Pass) -> int:
    """What one layer's attention keeps for one pass: queries, keys, values, output and the softmax statistics.
    transformers repeats the shared key/value heads before eager attention and before a masked sdpa call (every
    packed pass, a padded plain one); eager attention also keeps its probabilities; the CPU's split kernel keeps
    each rejected response's keys and values joined to the prompt's, and its mask."""
    q, kv, lin = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, setup.linear_bytes
    repeated = setup.kernel == "eager" or (setup.kernel == "sdpa" and (p.packed or p.padded))
    per_token = (2 * q + 2 * (q if repeated else kv)) * lin + arch.heads * 4  # q, out, k, v; log-sum-exp (fp32)
    total = p.tokens * per_token
    if setup.kernel == "eager":
        total += p.rows * arch.heads * p.length**2 * lin  # softmax probabilities
    if setup.kernel == "orpo_split_sdpa":
        total += sum(2 * (pp + n) * kv * lin + n * (pp + n) * 4 for pp, _, n in p.pairs)
    return total


def layer_bytes(arch: Arch, setup: Setup, p: Pass) -> int:
    """One decoder layer's kept activations for one pass, without checkpointing."""
    fused = setup.code == "orpo" and not setup.load_in_4bit  # 4-bit layers keep peft's and transformers' own forward
    res_h, lin_h, lin_i = LAYER_COEFFICIENTS[("orpo" if fused else "stock", setup.lora)]
    inter = arch.intermediate * arch.experts_per_token
    per_token = res_h * arch.hidden * setup.residual_bytes + (lin_h * arch.hidden + lin_i * inter) * setup.linear_bytes
    if setup.lora:
        per_token += LORA_INTERMEDIATES * setup.r * setup.linear_bytes
        if setup.dropout and fused:
            per_token += (6 * arch.hidden + inter) / 8  # one bit per dropped value
    return int(p.tokens * per_token + attention_bytes(arch, setup, p))


def head_bytes(arch: Arch, setup: Setup, p: Pass) -> tuple[int, int]:
    """(kept, transient) bytes of the output layer for one pass.

    packed: kept d log p / d h (N x H) for a frozen layer, the hidden states when it trains; transient: one
    chunk's logits (fp32, plus the matmul's own dtype) and, for a trained layer, the fp32 weight gradient.
    plain / TRL: the full logits (linear dtype) and their fp32 log-softmax; the backward adds a gradient of each."""
    v, lin = arch.vocab, setup.linear_bytes
    if p.packed and setup.code == "orpo":
        n = p.scored
        kept = n * arch.hidden * lin
        chunk = min(setup.chunk, n)
        transient = chunk * v * (4 + (lin if lin != 4 else 0))
        if not setup.lora:  # trained output layer: its fp32 gradient is built chunk by chunk
            transient += v * arch.hidden * 4 if lin != 4 else 0
            if n * v <= 2 * (1 << 24):
                kept += n * v * 4  # d log p / d logits kept from the forward
        return kept, transient
    cells = p.rows * p.length * v
    if setup.code == "orpo":  # token_logps: the logits kept (and their fp32 copy under mixed precision); logsumexp's
        # exponentials in the forward; in the backward its gradient, the gather's and the slice's full-size ones
        kept = cells * lin + (cells * 4 if lin != 4 else 0)
        return kept, 3 * cells * 4
    # TRL: logits kept for the metrics, chosen half copied for the NLL's cross-entropy (fp32 log-softmax kept),
    # selective_log_softmax's fp32 log-softmax of every row kept; the backward's gradients of both
    kept = cells * lin + cells // 2 * (lin + 4) + cells * 4
    return kept, 3 * cells * 4


def mask_bytes(setup: Setup, p: Pass) -> int:
    """The attention mask the model's forward gets, held for the whole pass (every checkpointed layer keeps it as
    an input): rows x length x length booleans for sdpa (a packed pass, a padded plain one), additive values in
    the linear dtype for eager attention; flex_attention's block mask and an unpadded plain pass need none."""
    if setup.kernel in ("flex_attention", "flash_attention_2") or not (p.packed or p.padded):
        return 0
    return p.rows * p.length**2 * (setup.linear_bytes if setup.kernel == "eager" else 1)


def pass_bytes(arch: Arch, setup: Setup, p: Pass) -> tuple[int, int, int]:
    """(activations kept by the layers and the mask, kept by the output layer, the largest transient) of one pass."""
    layer = layer_bytes(arch, setup, p)
    if setup.gradient_checkpointing:
        kept = arch.layers * p.tokens * arch.hidden * setup.residual_bytes + p.tokens * arch.hidden * setup.residual_bytes
        rebuild = layer  # one layer's activations, recomputed in the backward
    else:
        kept, rebuild = arch.layers * layer + p.tokens * arch.hidden * setup.residual_bytes, 0
    head_kept, head_transient = head_bytes(arch, setup, p)
    h_units, i_units = BACKWARD_TRANSIENT
    backward = rebuild + p.tokens * (h_units * arch.hidden + i_units * arch.intermediate * arch.experts_per_token) * setup.linear_bytes
    return int(kept + mask_bytes(setup, p)), int(head_kept), int(max(head_transient, backward))


def lora_copies(arch: Arch, setup: Setup) -> int:
    """orpo's fused LoRA layers keep scaled copies of A and B for the backward (as many bytes as the adapters, fp32);
    under gradient checkpointing only the layer being rebuilt holds them, briefly (not counted)."""
    if not setup.lora or setup.code != "orpo" or setup.load_in_4bit or setup.gradient_checkpointing:
        return 0
    return sum(lora_tensors(arch, setup)) * 4


def peak(arch: Arch, setup: Setup, steps: list[list[Pass]], runtime: int = 0, shards: dict[str, int] | None = None,
         heap: float = 0.0) -> Parts:
    """The peak of a process that trains `steps` (each a list of passes), by part.

    Optimizer states exist from the first update on, so every later step holds them with its activations.
    Gradients: a LoRA run's are small and counted whole; in full fine-tuning a step's first pass grows them
    while its activations are freed (the larger of the two counts), and a later pass of the same step runs its
    forward with the whole gradient held. That is what the tensors need at once, on a GPU and on a CPU alike.
    `heap` (CPU): glibc's heap keeps memory that tensors freed, resident though free; counted as `heap` x the
    bytes one forward pass's layers allocate (every layer's activations, checkpointed or not) of the largest pass.
    `shards`: divisors of weights / gradients / optimizer per process (FSDP2, ZeRO)."""
    shards = shards or {}
    sizes = trainable_tensors(arch, setup)
    trained = sum(sizes)
    grad_dtype = 4 if setup.lora else setup.weight_bytes
    parts = Parts(runtime=runtime)
    weights, parts.notes = weight_bytes(arch, setup)
    parts.weights = weights // shards.get("weights", 1)
    parts.lora = (trained * 4 + lora_copies(arch, setup)) // shards.get("weights", 1) if setup.lora else 0
    grads = trained * grad_dtype // shards.get("gradients", 1)
    parts.optimizer = optimizer_bytes(sizes, grad_dtype, setup.optim) // shards.get("optimizer", 1)
    best = None
    for passes in steps:
        for i, p in enumerate(passes):
            kept, head, transient = pass_bytes(arch, setup, p)
            if setup.lora or i > 0:
                held = grads
                total = kept + head + transient + held
            else:  # full fine-tuning, a step's first pass: the gradient grows as the activations go
                held = max(0, grads - kept - head)
                total = kept + head + transient + held
            if best is None or total > best[0]:
                best = (total, kept, head, transient, held)
    if best is None:  # no passes: the gradients whole
        parts.gradients = grads
    else:
        _, parts.activations, parts.output_layer, parts.transient, parts.gradients = best
    if heap and steps:
        parts.heap = int(heap * max(arch.layers * layer_bytes(arch, setup, p) for passes in steps for p in passes))
    return parts


def gib(n: float) -> float:
    return n / GIB
