"""Training memory of a stage per process, estimated from the model's config.json before any model loads; preflight
compares it with the machine (GPU memory per device when CUDA is used, else RAM).

With h hidden size, L layers, I MLP width, V vocabulary, kv = num_key_value_heads · h / num_attention_heads:

    P  parameters      = V·h·(1 if tied embeddings else 2) + L·(2·h² + 2·h·kv + 3·h·I) + (2L + 1)·h
    w  bytes/weight    = 2 for bf16, else 4 (fp16 keeps fp32 weights and autocasts)
    model states       = P·w weights + P·w gradients + P·8 Adam moments (two, fp32); ZeRO stage z over W processes
                         divides the moments by W (z ≥ 1), the gradients too (z ≥ 2), the weights too (z = 3)
    reference model    = P·w (GRPO with β > 0; ÷ W under ZeRO-3)
    activations        = m·T·L·17·h·a, a = 2 bytes under bf16/fp16 else 4 (Korthikanti et al. 2022: 34·h bytes per
                         token and layer at 16 bits, the attention scores not kept); with gradient checkpointing
                         m·T·h·a·(L + 17): each layer's input, and one layer's activations at a time
    logits             = c·V·4·2: logits and log-softmax in fp32 of c positions (GRPO: logprob_chunk_size; SFT: all m·T)

m is the micro-batch (micro_batch_size, else the rank's whole minibatch) and T its sequence length (GRPO:
max_prompt_length + max_completion_length; SFT: max_length). It ignores what is small or varies by kernel (biases,
norm statistics, the sampler's KV cache, allocator fragmentation): a run it refuses cannot fit; one it passes may not.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
ACTIVATION_BYTES_PER_TOKEN_LAYER = 17  # × h × activation bytes (34·h at 16 bits)


@dataclass
class Estimate:
    parameters: int
    model_states: float  # bytes: weights + gradients + optimiser (+ reference model), per process
    activations: float
    logits: float
    micro_batch: int
    tokens: int

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.logits

    def describe(self, zero_stage: int, world: int) -> str:
        return (f"{gib(self.total)} per process: model states {gib(self.model_states)} ({self.parameters:,} parameters, "
                f"ZeRO stage {zero_stage} over {world} process(es)), activations {gib(self.activations)} (micro-batch "
                f"{self.micro_batch} × {self.tokens} tokens), logits {gib(self.logits)}")


def gib(n: float) -> str:
    """Bytes as GiB (MiB below one GiB)."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 1024**2:.1f} MiB"


def parameter_count(config: dict) -> int:
    """P from a Hugging Face config.json (Qwen2/Llama-style decoder)."""
    h, n_layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    kv_width = kv * h // heads
    vocab = config["vocab_size"]
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings", False) else 2)
    return embeddings + n_layers * (2 * h * h + 2 * h * kv_width + 3 * h * inter) + (2 * n_layers + 1) * h


def estimate(config: dict, precision: str, micro_batch: int, tokens: int, gradient_checkpointing: bool,
             logits_positions: int, zero_stage: int = 0, world: int = 1, reference_model: bool = False) -> Estimate:
    """Training memory of one process (see the module's formula)."""
    p = parameter_count(config)
    w = 2 if precision == "bf16" else 4
    a = 4 if precision == "fp32" else 2
    weights, grads, moments = p * w, p * w, p * 8
    moments /= world if zero_stage >= 1 else 1
    grads /= world if zero_stage >= 2 else 1
    weights /= world if zero_stage >= 3 else 1
    reference = (p * w / (world if zero_stage >= 3 else 1)) if reference_model else 0
    h, n_layers = config["hidden_size"], config["num_hidden_layers"]
    per_token = h * a * ((n_layers + ACTIVATION_BYTES_PER_TOKEN_LAYER) if gradient_checkpointing
                         else n_layers * ACTIVATION_BYTES_PER_TOKEN_LAYER)
    return Estimate(parameters=p, model_states=weights + grads + moments + reference,
                    activations=micro_batch * tokens * per_token, logits=logits_positions * config["vocab_size"] * 8,
                    micro_batch=micro_batch, tokens=tokens)


def machine_memory(device: str) -> tuple[float, str] | None:
    """(bytes, what) a process can use: the first GPU's memory when CUDA is used, else the RAM available now (Linux
    MemAvailable, else the total); None when unknown."""
    if device != "cpu":
        import torch  # lazy: preflight runs before any model loads and must start fast

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return float(props.total_memory), f"GPU memory of {props.name}"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return float(info["MemAvailable"].split()[0]) * 1024, "available RAM"
    except (OSError, KeyError, ValueError):
        pass
    try:
        import os

        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "RAM"
    except (ValueError, OSError, AttributeError):
        return None
