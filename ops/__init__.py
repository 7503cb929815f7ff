"""Pure JAX functions (no parameters, no Flax) for decoder language models."""
from .activations import (ACTIVATIONS, geglu, gelu, gelu_tanh, get_activation, glu,
                          relu, silu, swiglu)
from .attention import (alibi_bias, attention, attention_mask, default_positions,
                        soft_cap, xla_attention)
from .norms import layer_norm, rms_norm
from .positional import alibi_slopes, sinusoidal_positions
from .rope import RopeScaling, apply_rope, rope_cos_sin, rope_frequencies, yarn_mscale
from .moe import (Routing, add_shared_experts, capacity_dispatch, combine_weights,
                  expert_capacity, expert_load, group_limited_topk, load_balance_loss,
                  moe_capacity, moe_dense, moe_dropless, routed_experts, router_logits,
                  router_z_loss, sigmoid_topk_router, softmax_topk_router,
                  update_router_bias)
from .sampling import (Sampling, apply_temperature, filter_logits, min_p_logits, probabilities,
                       sample, sample_rows, top_k_logits, top_p_logits)
from .speculative import accept, greedy_accept, ngram_propose, rejection_accept
from .paged import gather_pages, paged_attention, paged_write
from .preference import (cdpo_loss, dpo_loss, hinge_loss, ipo_loss, orpo_loss,
                         preference_loss, robust_dpo_loss, sequence_logps, simpo_loss)
from .ring import allgather_attention, context_attention, ring_attention
from .quant import (dequantize_int4, dequantize_int8, dequantize_kv, int4_matmul, int8_matmul,
                    pack_int4, quantize_int4, quantize_int8, quantize_kv, unpack_int4)
