"""Generation over a static, preallocated cache.

* `api`: `generate(model, input_ids, ...)`, like transformers' `generate` (greedy or sampling, EOS, pad,
  left-padded batches): the argument checks, then one compiled program per shape bucket.
* `steps`: the prefill and decode programs, and `generate`'s loop (prefill, then a `lax.while_loop` of
  decode steps), each built once per set of XLA compiler options (the model's Options.compiler_options).
* `sampling`: temperature / top-k / top-p filters and token selection.
* `speculative`: self-speculative decoding with DeepSeek-V3's MTP layer.
* `streaming`: tokens to the host from inside the compiled loop, per call (`Channel`).

`jaxmodels.generate` is the function; this package is `sys.modules["jaxmodels.generate"]`.
"""

from jaxmodels.generate.api import generate
from jaxmodels.generate.sampling import filter_logits, select_tokens
from jaxmodels.generate.steps import (COMPILER_OPTIONS, GenerationError, bucket, decode_step, prefill,
                                      prompt_positions, read_lengths)

__all__ = ["generate", "prefill", "decode_step", "bucket", "filter_logits", "select_tokens", "GenerationError",
           "prompt_positions", "read_lengths", "COMPILER_OPTIONS"]
