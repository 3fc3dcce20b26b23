"""Generation with a KV cache: prompt -> transcript and text continuation -> spectrogram frames.

The decoder sequence is the fixed-slot layout of training (docs/CONTRACTS.md section 2), written
into one KV cache of S = P + text slots + N slots:

    prefill  [P prefix slots][BOS]           one chunk, prefix bidirectional among itself
    text     one slot per generated token    `lax.while_loop` until every row emitted EOS
    frames   one slot per frame group        `lax.while_loop`: pre-net(previous group) in,
                                             post-net group out, until N groups or the stop logit

All rows of the batch write the same cache slot at each step (the cache index is a scalar); a
row that has finished its text writes an invalid slot (masked out of attention, no position
advance), exactly like padding inside the text region of a training batch, so a batch decodes
every row as if it were alone. Positions are `cumsum(valid) - 1` as in training, which makes the
cached run equal a teacher-forced pass over the generated sequence (tests/test_decoding.py).

Everything after the host call is one jitted program per (model config, static decode options,
batch shapes); the seed, BOS/EOS ids, temperature, top-k/top-p values and the stop rule are
traced values, so changing them does not recompile (only switching greedy/sampling, top-k or
top-p on/off, the text mode or the lengths does).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from spectron_jax.network import Spectron
from spectron_jax.nn.attention import decode_mask, positions_from_valid, prefix_lm_mask
from spectron_jax.nn.decoder import Decoder, init_cache
from spectron_jax.nn.speech_heads import group_frames, ungroup_frames

if TYPE_CHECKING:
    from spectron_jax.config import SpectronConfig
    from spectron_jax.models import SpectronModel

PyTree = Any
TEXT_MODES = ("free", "forced", "text_only")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Decoding options.

    Attributes:
      max_text_tokens: text decoding limit (tokens after BOS, EOS included).
      max_frames: spectrogram frames to generate (the requested duration).
      temperature: softmax temperature; 0 = greedy.
      top_k: keep the k most likely tokens when sampling; 0 = off.
      top_p: nucleus sampling mass; 1 = off.
      text_mode: "free" (generate text, then speech), "forced" (take the batch's
        `decoder_input_tokens`, generate only speech) or "text_only" (no frames).
      use_stop_logit: stop a row when sigmoid(stop) > stop_threshold (needs a stop head).
      stop_threshold: probability above which a row stops.
      seed: PRNG seed of sampling and of the pre-net's inference dropout.
      bos_id: first decoder input token (3 in the tiny vocabulary; Gemma: 2).
      eos_id: end-of-text token (1 in the tiny vocabulary and Gemma).
    """

    max_text_tokens: int = 64
    max_frames: int = 500
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    text_mode: str = "free"
    use_stop_logit: bool = False
    stop_threshold: float = 0.5
    seed: int = 0
    bos_id: int = 3
    eos_id: int = 1

    def __post_init__(self):
        problems = []
        if self.text_mode not in TEXT_MODES:
            problems.append(f"text_mode={self.text_mode!r} not in {TEXT_MODES}")
        if self.max_text_tokens < 1:
            problems.append(f"max_text_tokens={self.max_text_tokens} must be >= 1")
        if self.max_frames < 0:
            problems.append(f"max_frames={self.max_frames} must be >= 0")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if problems:
            raise ValueError("Invalid DecodeConfig: " + "; ".join(problems))

    def static_key(self) -> DecodeConfig:
        """The options that change the compiled program (shapes, branches); the rest are traced."""
        return dataclasses.replace(
            self,
            temperature=float(self.temperature > 0),
            top_k=int(self.top_k > 0),
            top_p=0.5 if self.top_p < 1.0 else 1.0,
            use_stop_logit=False,
            stop_threshold=0.5,
            seed=0,
            bos_id=0,
            eos_id=0,
        )


# ------------------------------------------------------------------------------------------------
# Sampling.
# ------------------------------------------------------------------------------------------------


def filter_logits(
    logits: jax.Array, top_k: jax.Array | int | None = None, top_p: jax.Array | float | None = None
) -> jax.Array:
    """Top-k, then top-p (nucleus) filtering: removed tokens get -inf.

    Args:
      logits: float32[B, V] (already divided by the temperature).
      top_k: keep the k largest logits (ties at the k-th value are kept); None or 0 = off.
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p (the
        most likely token is always kept); None or >= 1 = off.

    Returns:
      float32[B, V].
    """
    neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
    v = logits.shape[-1]
    if top_k is not None:
        k = jnp.asarray(top_k, jnp.int32)
        k = jnp.where(k > 0, jnp.minimum(k, v), v)
        sorted_desc = -jnp.sort(-logits, axis=-1)
        kth = jnp.take(sorted_desc, k - 1, axis=-1)[..., None]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p is not None:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < jnp.asarray(top_p, probs.dtype)  # The first token always passes.
        # Smallest kept logit per row: every logit at least that large stays.
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def sample_tokens(
    rng: jax.Array, logits: jax.Array, options: DecodeConfig, knobs: Mapping[str, jax.Array]
) -> jax.Array:
    """float32[B, V] -> int32[B]: argmax when greedy, else a filtered categorical draw."""
    if options.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / knobs["temperature"]
    logits = filter_logits(
        logits,
        top_k=knobs["top_k"] if options.top_k > 0 else None,
        top_p=knobs["top_p"] if options.top_p < 1.0 else None,
    )
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------
# Step functions (run through `Spectron.apply(..., method=...)`).
# ------------------------------------------------------------------------------------------------


def _decoder_chunk(module: Spectron, x, positions, mask):
    """float[B, T, D] embeddings -> hidden, written into the KV cache at its index."""
    return module.decoder(x, positions, mask, decode=True)


def _text_step(module: Spectron, tokens, positions, mask):
    """int32[B, 1] fed tokens -> float32[B, 1, V] logits of the next token."""
    hidden = module.decoder(module.decoder.embed(tokens), positions, mask, decode=True)
    return module.decoder.logits(hidden)


def _frame_step(module: Spectron, prev_groups, positions, mask):
    """float32[B, 1, r*M] previous group -> (next group float32[B, 1, r*M], stop or None)."""
    x = module.frame_inputs(prev_groups, deterministic=True)  # Pre-net dropout as configured.
    hidden = module.decoder(x, positions, mask, decode=True)
    return module.frame_outputs(hidden)


def _prefill_mask(valid: jax.Array, is_prefix: jax.Array, cache_length: int) -> jax.Array:
    """Prefix-LM mask of the first chunk, widened to the cache: bool[B, 1, T, S]."""
    mask = prefix_lm_mask(valid, is_prefix)
    return jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, cache_length - valid.shape[1])))


def _set_column(x: jax.Array, index: jax.Array, value: jax.Array) -> jax.Array:
    """x[:, index] = value for a traced index (out-of-range writes are dropped)."""
    return x.at[:, index].set(value.astype(x.dtype), mode="drop")


# ------------------------------------------------------------------------------------------------
# The compiled program.
# ------------------------------------------------------------------------------------------------


def _generate(
    module: Spectron,
    options: DecodeConfig,
    params: PyTree,
    batch: Mapping[str, jax.Array],
    knobs: Mapping[str, jax.Array],
) -> dict[str, jax.Array]:
    c = module.config
    r, n_mels = c.reduction_factor, c.n_mels
    eos = knobs["eos_id"]
    sample_rng, dropout_rng = jax.random.split(knobs["rng"])

    def run(cache, method, *args, rng=None):
        out, updated = module.apply(
            {"params": params, "cache": cache},
            *args,
            method=method,
            mutable=["cache"],
            rngs={"dropout": dropout_rng if rng is None else rng},
        )
        return out, updated["cache"]

    prefix, prefix_mask = module.apply(
        {"params": params}, batch["encoder_features"], batch["encoder_mask"], method=Spectron.encode
    )
    b, p = prefix_mask.shape
    max_text = options.max_text_tokens
    if options.text_mode == "forced":
        first_tokens = batch["decoder_input_tokens"].astype(jnp.int32)
        if "text_part" in batch:
            first_valid = (batch["text_part"] > 0).astype(jnp.int32)
        else:
            first_valid = (first_tokens != 0).astype(jnp.int32)
        text_slots = first_tokens.shape[1]
    else:
        first_tokens = jnp.full((b, 1), knobs["bos_id"], jnp.int32)
        first_valid = jnp.ones((b, 1), jnp.int32)
        # BOS, then every generated token but the last one (EOS, or the limit's last token, which
        # is still fed so that speech follows the whole text).
        text_slots = 1 + max_text
    n_groups = 0 if options.text_mode == "text_only" else -(-options.max_frames // r)
    cache_length = p + text_slots + n_groups

    decoder = Decoder(c.decoder)
    cache = {"decoder": init_cache(decoder, b, cache_length)}

    # -- prefill: [prefix][BOS] (or [prefix][forced text]) in one chunk ----------------------
    dtype = jnp.dtype(c.decoder.dtype)
    x = jnp.concatenate(
        [
            prefix.astype(dtype),
            module.apply({"params": params}, first_tokens, method=_embed).astype(dtype),
        ],
        axis=1,
    )
    valid = jnp.concatenate([prefix_mask.astype(jnp.int32), first_valid], axis=1)
    is_prefix = jnp.zeros_like(valid).at[:, :p].set(prefix_mask)
    hidden, cache = run(
        cache,
        _decoder_chunk,
        x,
        positions_from_valid(valid),
        _prefill_mask(valid, is_prefix, cache_length),
    )
    key_valid = jnp.pad(valid, ((0, 0), (0, cache_length - valid.shape[1])))
    next_pos = jnp.sum(valid, axis=-1)  # Position of each row's next valid slot.
    index = jnp.asarray(valid.shape[1], jnp.int32)  # Next cache slot.

    # -- text ----------------------------------------------------------------------------------
    if options.text_mode == "forced":
        # The given transcript (inputs after BOS), EOS appended, cut to max_text_tokens.
        n_given = jnp.maximum(jnp.sum(first_valid, axis=-1) - 1, 0)
        given = jnp.pad(first_tokens[:, 1:], ((0, 0), (0, max_text + 1)))[:, :max_text]
        col = jnp.arange(max_text)[None, :]
        text_tokens = jnp.where(col < n_given[:, None], given, 0)
        text_tokens = jnp.where(col == n_given[:, None], eos, text_tokens).astype(jnp.int32)
        text_lengths = jnp.minimum(n_given, max_text).astype(jnp.int32)
    else:
        last_logits = module.apply({"params": params}, hidden[:, -1:], method=_logits)[:, 0]
        tok = sample_tokens(jax.random.fold_in(sample_rng, 0), last_logits, options, knobs)
        text_tokens = jnp.zeros((b, max_text), jnp.int32).at[:, 0].set(tok)
        done = tok == eos
        state = dict(
            cache=cache,
            tok=tok,
            done=done,
            tokens=text_tokens,
            lengths=jnp.zeros((b,), jnp.int32),
            k=jnp.asarray(1, jnp.int32),
            index=index,
            key_valid=key_valid,
            next_pos=next_pos,
        )

        def text_cond(s):
            return jnp.any(~s["done"]) & (s["k"] <= max_text)

        def text_body(s):
            active = ~s["done"]  # Rows whose last token is to be fed (not EOS, not past).
            key_valid = _set_column(s["key_valid"], s["index"], active)
            logits, cache = run(
                s["cache"],
                _text_step,
                s["tok"][:, None],
                s["next_pos"][:, None],
                decode_mask(key_valid, s["index"], 1),
            )
            new = sample_tokens(
                jax.random.fold_in(sample_rng, s["k"]), logits[:, 0], options, knobs
            )
            write = active & (s["k"] < max_text)
            tokens = _set_column(s["tokens"], s["k"], jnp.where(write, new, 0))
            return dict(
                cache=cache,
                tok=new,
                done=s["done"] | ~write | (new == eos),
                tokens=tokens,
                lengths=s["lengths"] + active,
                k=s["k"] + 1,
                index=s["index"] + 1,
                key_valid=key_valid,
                next_pos=s["next_pos"] + active,
            )

        state = jax.lax.while_loop(text_cond, text_body, state)
        cache, index = state["cache"], state["index"]
        key_valid, next_pos = state["key_valid"], state["next_pos"]
        text_tokens, text_lengths = state["tokens"], state["lengths"]

    out = {"text_tokens": text_tokens, "text_lengths": text_lengths}
    if n_groups == 0:
        out["frames"] = jnp.zeros((b, 0, n_mels), jnp.float32)
        out["frame_lengths"] = jnp.zeros((b,), jnp.int32)
        return out

    # -- frames --------------------------------------------------------------------------------
    group_dim = r * n_mels
    state = dict(
        cache=cache,
        prev=jnp.zeros((b, group_dim), jnp.float32),  # Group -1 = zeros, as in training.
        active=jnp.ones((b,), bool),
        groups=jnp.zeros((b, n_groups, group_dim), jnp.float32),
        stop_probs=jnp.zeros((b, n_groups), jnp.float32),
        count=jnp.zeros((b,), jnp.int32),
        j=jnp.asarray(0, jnp.int32),
        index=index,
        key_valid=key_valid,
        next_pos=next_pos,
    )

    def frame_cond(s):
        return jnp.any(s["active"]) & (s["j"] < n_groups)

    def frame_body(s):
        active = s["active"]
        key_valid = _set_column(s["key_valid"], s["index"], active)
        (group, stop), cache = run(
            s["cache"],
            _frame_step,
            s["prev"][:, None],
            s["next_pos"][:, None],
            decode_mask(key_valid, s["index"], 1),
            rng=jax.random.fold_in(dropout_rng, s["j"]),
        )
        group = group[:, 0].astype(jnp.float32)
        groups = s["groups"].at[:, s["j"]].set(jnp.where(active[:, None], group, 0.0))
        stop_probs = s["stop_probs"]
        still = active
        if stop is not None:
            prob = jax.nn.sigmoid(stop[:, 0].astype(jnp.float32))
            stop_probs = stop_probs.at[:, s["j"]].set(jnp.where(active, prob, 0.0))
            # The stop target is 1 on the last group (losses.stop_targets): keep it, then stop.
            # Without use_stop_logit the threshold is +inf.
            still = active & ~(prob > knobs["stop_threshold"])
        return dict(
            cache=cache,
            prev=group,
            active=still,
            groups=groups,
            stop_probs=stop_probs,
            count=s["count"] + active,
            j=s["j"] + 1,
            index=s["index"] + 1,
            key_valid=key_valid,
            next_pos=s["next_pos"] + active,
        )

    state = jax.lax.while_loop(frame_cond, frame_body, state)
    out["frames"] = ungroup_frames(state["groups"], n_mels)[:, : options.max_frames]
    out["frame_lengths"] = jnp.minimum(state["count"] * r, options.max_frames).astype(jnp.int32)
    if c.stop_head:
        out["stop_probs"] = state["stop_probs"]
    return out


def _embed(module: Spectron, tokens):
    return module.decoder.embed(tokens)


def _logits(module: Spectron, hidden):
    return module.decoder.logits(hidden)


@functools.lru_cache(maxsize=32)
def _compiled(model_config: SpectronConfig, options: DecodeConfig):
    """One jitted program per model config and static decode options (jit caches per shape)."""
    module = Spectron(model_config)
    return jax.jit(functools.partial(_generate, module, options))


def _knobs(config: DecodeConfig, rng: jax.Array | None) -> dict[str, jax.Array]:
    return {
        "rng": jax.random.PRNGKey(config.seed) if rng is None else rng,
        "temperature": jnp.asarray(max(config.temperature, 1e-6), jnp.float32),
        "top_k": jnp.asarray(config.top_k, jnp.int32),
        "top_p": jnp.asarray(config.top_p, jnp.float32),
        "stop_threshold": jnp.asarray(
            config.stop_threshold if config.use_stop_logit else jnp.inf, jnp.float32
        ),
        "bos_id": jnp.asarray(config.bos_id, jnp.int32),
        "eos_id": jnp.asarray(config.eos_id, jnp.int32),
    }


def _check(model_config: SpectronConfig, batch: Mapping[str, Any], config: DecodeConfig):
    missing = [k for k in ("encoder_features", "encoder_mask") if k not in batch]
    if config.text_mode == "forced" and "decoder_input_tokens" not in batch:
        missing.append("decoder_input_tokens")
    if missing:
        raise ValueError(f"generate(text_mode={config.text_mode!r}): batch lacks {missing}")
    if config.use_stop_logit and not model_config.stop_head:
        raise ValueError("DecodeConfig.use_stop_logit needs a model with stop_head=True")


def generate(
    model: SpectronModel,
    params: PyTree,
    batch: Mapping[str, Any],
    config: DecodeConfig,
    *,
    rng: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Generates text, then speech, for a batch of prompts (one compiled program).

    Args:
      model: the `SpectronModel` (its `config` picks the network).
      params: its parameters (boxed or not).
      batch: `encoder_features` float32[B, T_p, F], `encoder_mask` int32[B, T_p]; for
        text_mode "forced" also `decoder_input_tokens` int32[B, L] (`[BOS] transcript`) and
        optionally `text_part` int32[B, L] (> 0 = valid; else tokens != 0 are valid).
      config: decoding options.
      rng: PRNG key of sampling and pre-net dropout; default `PRNGKey(config.seed)`.

    Returns:
      `text_tokens` int32[B, max_text_tokens] (generated ids, EOS included, 0 after),
      `text_lengths` int32[B] (tokens before EOS), `frames` float32[B, max_frames, n_mels]
      (zeros after `frame_lengths`; [B, 0, n_mels] for "text_only"), `frame_lengths` int32[B];
      with a stop head also `stop_probs` float32[B, ceil(max_frames / r)] (0 where not run).
    """
    _check(model.config, batch, config)
    keys = ["encoder_features", "encoder_mask"]
    if config.text_mode == "forced":
        keys += [k for k in ("decoder_input_tokens", "text_part") if k in batch]
    inputs = {k: jnp.asarray(batch[k]) for k in keys}
    return _compiled(model.config, config.static_key())(params, inputs, _knobs(config, rng))


def predict_batch_with_aux(
    model: SpectronModel,
    params: PyTree,
    batch: Mapping[str, Any],
    rng: jax.Array | None = None,
    **decode_options,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """T5X-shaped entry point: (outputs, aux) = ({text_tokens, frames}, {lengths, ...})."""
    out = generate(model, params, batch, DecodeConfig(**decode_options), rng=rng)
    outputs = {"text_tokens": out["text_tokens"], "frames": out["frames"]}
    aux = {k: v for k, v in out.items() if k not in outputs}
    return outputs, aux


# ------------------------------------------------------------------------------------------------
# The uncached baseline (benchmarks, tests): the whole network re-run for every frame group.
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _compiled_uncached(model_config: SpectronConfig, max_frames: int):
    module = Spectron(model_config)
    r, n_mels = model_config.reduction_factor, model_config.n_mels
    n_groups = -(-max_frames // r)

    def fn(params, batch, rng):
        b = batch["encoder_features"].shape[0]
        text_part = batch.get("text_part")
        if text_part is None:
            text_part = (batch["decoder_input_tokens"] != 0).astype(jnp.int32)

        def body(j, groups):
            frame_mask = jnp.repeat((jnp.arange(n_groups) <= j)[None], b, 0).astype(jnp.int32)
            full = dict(
                encoder_features=batch["encoder_features"],
                encoder_mask=batch["encoder_mask"],
                decoder_input_tokens=batch["decoder_input_tokens"],
                text_part=text_part,
                target_frames=ungroup_frames(groups, n_mels),
                frame_mask=jnp.repeat(frame_mask, r, axis=1),
            )
            _, pred, _ = module.apply(
                {"params": params},
                full,
                deterministic=True,
                rngs={"dropout": jax.random.fold_in(rng, j)},
            )
            return groups.at[:, j].set(group_frames(pred, r)[:, j])

        groups = jnp.zeros((b, n_groups, r * n_mels), jnp.float32)
        groups = jax.lax.fori_loop(0, n_groups, body, groups)
        return ungroup_frames(groups, n_mels)[:, :max_frames]

    return jax.jit(fn)


def generate_frames_uncached(
    model: SpectronModel,
    params: PyTree,
    batch: Mapping[str, Any],
    max_frames: int,
    *,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Speech for a given transcript without a cache: float32[B, max_frames, n_mels].

    Each frame group re-runs `Spectron.__call__` over the whole fixed-slot sequence (prefix, the
    batch's `decoder_input_tokens`, every frame slot, the ones not generated yet masked out), so
    its cost grows with the sequence length at every step. It equals `generate(...,
    text_mode="forced")` when the pre-net has no inference dropout.
    """
    _check(model.config, batch, DecodeConfig(text_mode="forced"))
    keys = ("encoder_features", "encoder_mask", "decoder_input_tokens", "text_part")
    inputs = {k: jnp.asarray(batch[k]) for k in keys if k in batch}
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return _compiled_uncached(model.config, max_frames)(params, inputs, rng)


def audio_seconds(model_config: SpectronConfig, num_frames: int) -> float:
    """Seconds of audio in `num_frames` frames at the spectrogram's frame rate."""
    return num_frames / model_config.spectrogram.frames_per_second


__all__ = [
    "DecodeConfig",
    "TEXT_MODES",
    "audio_seconds",
    "filter_logits",
    "generate",
    "generate_frames_uncached",
    "predict_batch_with_aux",
    "sample_tokens",
]
