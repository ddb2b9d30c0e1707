import jax.numpy as jnp
import numpy as np
import pytest

import jaxmodels
from tiny import hf_logits, make_checkpoint, max_rel_err, random_batch


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3", "stablelm"])
def test_causal_lm_matches_transformers(tmp_path, family):
    path, hf = make_checkpoint(tmp_path, family)
    ids, mask = random_batch(hf.config.vocab_size, pad_left=3)
    ours = jaxmodels.from_pretrained(path, progress=False)(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    err = max_rel_err(ours.logits, hf_logits(hf, ids, mask), mask)
    assert err < 1e-4, err
