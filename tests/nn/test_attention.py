"""Masks, RoPE and grouped-query attention against loop / numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectron_jax.nn import attention


def _np_prefix_lm(valid, prefix):
    b, t = valid.shape
    out = np.zeros((b, 1, t, t), bool)
    for n in range(b):
        for i in range(t):
            for j in range(t):
                bidir = prefix[n, i] and prefix[n, j]
                out[n, 0, i, j] = valid[n, i] and valid[n, j] and (j <= i or bidir)
    return out


def test_prefix_lm_mask_matches_loops():
    rng = np.random.default_rng(0)
    valid = rng.random((3, 9)) > 0.3
    prefix = np.zeros((3, 9), bool)
    prefix[:, :4] = True
    np.testing.assert_array_equal(
        attention.prefix_lm_mask(jnp.asarray(valid), jnp.asarray(prefix)),
        _np_prefix_lm(valid, prefix & valid),
    )
    np.testing.assert_array_equal(
        attention.causal_mask(jnp.asarray(valid)), _np_prefix_lm(valid, np.zeros_like(valid))
    )


def test_positions_skip_padding():
    valid = jnp.array([[1, 1, 0, 1, 0, 0, 1], [0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(
        attention.positions_from_valid(valid), [[0, 1, 1, 2, 2, 2, 3], [0, 0, 0, 1, 2, 3, 4]]
    )


def test_sliding_window_mask_is_exclusive_and_symmetric():
    q = jnp.array([[0, 3, 7]])
    k = jnp.array([[0, 1, 4, 7, 9]])
    got = np.asarray(attention.sliding_window_mask(q, k, 3))[0, 0]
    want = np.abs(np.array([0, 3, 7])[:, None] - np.array([0, 1, 4, 7, 9])[None]) < 3
    np.testing.assert_array_equal(got, want)


def test_decode_mask_equals_rows_of_the_causal_mask():
    valid = jnp.array([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 0]], bool)
    full = attention.causal_mask(valid)
    for start, length in ((0, 3), (3, 1), (4, 2)):
        got = attention.decode_mask(valid, start, length)
        rows = full[:, :, start : start + length]
        # decode_mask does not blank padding queries; compare on valid query rows.
        q_valid = np.asarray(valid[:, start : start + length])[:, None, :, None]
        np.testing.assert_array_equal(np.asarray(got) & q_valid, np.asarray(rows))


def _np_rope(x, positions, theta):
    dh = x.shape[-1]
    half = dh // 2
    freq = theta ** (-np.arange(half) * 2.0 / dh)
    ang = positions[..., None, None] * freq  # [B, T, 1, half]
    x1, x2 = x[..., :half], x[..., half:]
    # Pair (i, i + half) rotates as a complex number x1 + i*x2.
    z = (x1 + 1j * x2) * np.exp(1j * ang)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_matches_complex_rotation_and_is_relative():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    pos = rng.integers(0, 50, (2, 5))
    got = attention.apply_rope(jnp.asarray(x), jnp.asarray(pos), 100.0)
    np.testing.assert_allclose(got, _np_rope(x, pos, 100.0), atol=1e-4)

    q, k = rng.normal(size=(2, 1, 1, 1, 8)).astype(np.float32)

    def score(m, n):
        qm = attention.apply_rope(jnp.asarray(q), jnp.array([[m]]), 1e4)
        kn = attention.apply_rope(jnp.asarray(k), jnp.array([[n]]), 1e4)
        return float(jnp.sum(qm * kn))

    assert score(7, 3) == pytest.approx(score(17, 13), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def _np_attention(q, k, v, mask, scale, cap):
    b, t, h, dh = q.shape
    g = h // k.shape[2]
    k = np.repeat(k, g, axis=2)  # query head i reads kv head i // g, as HF's repeat_kv
    v = np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * scale
    if cap is not None:
        s = np.tanh(s / cap) * cap
    s = np.where(mask, s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("cap", [None, 2.0])
def test_gqa_attention_matches_numpy(cap):
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, 6, 4, 8)).astype(np.float32)
    k, v = rng.normal(size=(2, 2, 6, 2, 8)).astype(np.float32)
    valid = np.array([[1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]], bool)
    mask = np.asarray(attention.causal_mask(jnp.asarray(valid)))
    got = attention.dot_product_attention(
        *map(jnp.asarray, (q, k, v, mask)), scale=0.3, logit_softcap=cap
    )
    want = _np_attention(q, k, v, mask, 0.3, cap)
    rows = valid[:, :, None, None]
    np.testing.assert_allclose(np.where(rows, got, 0), np.where(rows, want, 0), atol=1e-5)
    assert np.isfinite(np.asarray(got)).all()  # the padding query (no allowed key) stays finite


def test_attention_rejects_wrong_mask_shape():
    module = attention.Attention(num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1e4, scale=1.0)
    x = jnp.zeros((2, 5, 16))
    pos = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"does not match \[B, 1, T, S\]"):
        module.init(jax.random.PRNGKey(0), x, pos, jnp.ones((2, 1, 5, 4), bool))


def test_cached_attention_rejects_mask_not_spanning_the_cache():
    module = attention.Attention(num_heads=2, num_kv_heads=1, head_dim=4, rope_theta=1e4, scale=1.0)
    x = jnp.zeros((1, 6, 8))
    pos = jnp.zeros((1, 6), jnp.int32)
    variables = module.init(
        jax.random.PRNGKey(0), x, pos, jnp.ones((1, 1, 6, 6), bool), decode=True
    )
    assert variables["cache"]["cached_key"].shape == (1, 6, 1, 4)
    assert int(variables["cache"]["cache_index"]) == 0  # creation call writes nothing
    with pytest.raises(ValueError, match=r"\[1, 1, 1, 6\]"):
        module.apply(
            variables,
            x[:, :1],
            pos[:, :1],
            jnp.ones((1, 1, 1, 5), bool),
            decode=True,
            mutable=["cache"],
        )
