import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmodels
from tiny import hf_logits, make_checkpoint, max_rel_err, random_batch


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3", "stablelm"])
def test_causal_lm_matches_transformers(tmp_path, family):
    path, hf = make_checkpoint(tmp_path, family)
    ids, mask = random_batch(hf.config.vocab_size, pad_left=3)
    ours = jaxmodels.from_pretrained(path, progress=False)(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    err = max_rel_err(ours.logits, hf_logits(hf, ids, mask), mask)
    assert err < 1e-4, err


def test_jit_over_split_state_matches_eager(tmp_path):
    """The README's pure-functional pattern: split once, jit a function of the state pytree, merge inside."""
    path, hf = make_checkpoint(tmp_path, "deepseek_v3")
    model = jaxmodels.from_pretrained(path, progress=False)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask).logits

    ids, mask = random_batch(hf.config.vocab_size, pad_left=2)
    jitted = forward(state, jnp.asarray(ids), jnp.asarray(mask))
    eager = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)
    assert max_rel_err(jitted, hf_logits(hf, ids, mask), mask) < 1e-4
