"""Inference: batched prefill, a one-jit decode loop, prefix caching and `generate`.

    from jaxlm.infer import generate, Engine, Sampling
    new = generate(lm, [[1, 2, 3], [4, 5]], max_new_tokens=32)                 # greedy
    new = generate(lm, prompts, max_new_tokens=64, sampling=Sampling(temperature=0.7,
                   top_p=0.9), seed=0, stop_tokens=(eos,))
    engine = Engine(base, adapters=[lora_lm, prefix_lm, "peft_dir"])   # several adapters
    new = engine.generate(prompts, max_new_tokens=32, adapter_ids=[0, 2, -1])
    engine = Engine(lm, speculative=Speculative("lookup", n_draft=4))  # exact, faster
    sched = Scheduler(lm, kv_memory=512 << 20)   # continuous batching over a paged cache
    engine = Engine(lm, quantize="int8", cache_dtype="int8")   # int8 weights and KV cache
"""
from jaxlm.ops.sampling import Sampling

from .cache import DecodeCache
from .engine import DecodeState, Engine, generate
from .forward import forward, split_model
from .prefix import PrefixCache
from .scheduler import Event, Request, Scheduler
from .speculative import Speculative

__all__ = ["DecodeCache", "DecodeState", "Engine", "Event", "PrefixCache", "Request",
           "Sampling", "Scheduler", "Speculative", "forward", "generate", "split_model"]
