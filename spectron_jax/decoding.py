"""Generation with a KV cache: prompt -> transcript and text continuation -> spectrogram frames.

The decoder sequence is the fixed-slot layout of training (docs/CONTRACTS.md section 2), written
into one KV cache of S = P + text slots + N slots, in three phases:

    prefill  [P prefix slots][BOS]           one chunk, prefix bidirectional among itself
             (or [prefix][forced text])
    text     one slot per generated token    `lax.while_loop` until every row emitted EOS
    primer   K / r slots, one chunk          the prompt's last K log-mel frames (only with
                                             `primer_frames` K > 0), teacher-forced
    frames   one slot per frame group        `lax.while_loop`: pre-net(previous group) in,
                                             post-net group out, until N groups or the stop logit

With a stop head and `use_stop_logit`, a row keeps the first group whose stop probability
crosses `stop_threshold` and ends there (the training target is 1 on the last valid group,
`losses.stop_targets`); `max_frames` is then the longest a row may speak. `DecodeConfig.for_model`
is what the entry points (inference, the CLI, evaluation) decode with: the stop logit whenever
the model has a stop head, unless they ask for a fixed duration.

All rows of the batch write the same cache slot at each step (the cache index is a scalar); a
row that has finished its text writes an invalid slot (masked out of attention, no position
advance), exactly like padding inside the text region of a training batch, so a batch decodes
every row as if it were alone. Positions are `cumsum(valid) - 1` as in training, which makes the
cached run equal a teacher-forced pass over the generated sequence (tests/test_decoding.py).

BOS and EOS are the model's (`model.bos_id`, `model.eos_id`) unless `DecodeConfig` names others.
Everything after the host call is one jitted program per (model config, static decode options,
batch shapes); the seed, BOS/EOS ids, temperature, top-k/top-p values and the stop rule are
traced values, so changing them does not recompile (only switching greedy/sampling, top-k or
top-p on/off, the text mode or the lengths does).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from spectron_jax import partitioning
from spectron_jax.interfaces import Model
from spectron_jax.network import Spectron
from spectron_jax.nn.attention import decode_mask, positions_from_valid, prefix_lm_mask
from spectron_jax.nn.decoder import Decoder, init_cache
from spectron_jax.nn.layers import ceil_div
from spectron_jax.nn.speech_heads import group_frames, shift_groups, ungroup_frames

if TYPE_CHECKING:
    from spectron_jax.config import SpectronConfig

PyTree = Any
TEXT_MODES = ("free", "forced", "text_only")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Decoding options.

    Attributes:
      max_text_tokens: text decoding limit (tokens after BOS, EOS included).
      max_frames: spectrogram frames to generate (the requested duration); with the stop logit
        the most a row may generate.
      temperature: softmax temperature; 0 = greedy.
      frame_temperature: noise scale of a stochastic frame head (`nn.frame_heads`); 0 = its
        mean (deterministic). No effect on the regression head.
      top_k: keep the k most likely tokens when sampling; 0 = off.
      top_p: nucleus sampling mass; 1 = off.
      text_mode: "free" (generate text, then speech), "forced" (take the batch's
        `decoder_input_tokens`, generate only speech) or "text_only" (no frames).
      use_stop_logit: stop a row after the first group whose sigmoid(stop) > stop_threshold
        (needs a stop head). False here; `for_model` turns it on for a stop-head model.
      stop_threshold: probability above which a row stops, in [0, 1].
      seed: PRNG seed of sampling and of the pre-net's inference dropout.
      bos_id: first decoder input token; None = the model's `bos_id`.
      eos_id: end-of-text token; None = the model's `eos_id`.
    """

    max_text_tokens: int = 64
    max_frames: int = 500
    temperature: float = 0.0
    frame_temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    text_mode: str = "free"
    use_stop_logit: bool = False
    stop_threshold: float = 0.5
    seed: int = 0
    bos_id: int | None = None
    eos_id: int | None = None

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
        if self.frame_temperature < 0:
            problems.append(f"frame_temperature={self.frame_temperature} must be >= 0")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if not 0.0 <= self.stop_threshold <= 1.0:
            problems.append(f"stop_threshold={self.stop_threshold} must be in [0, 1]")
        if problems:
            raise ValueError("Invalid DecodeConfig: " + "; ".join(problems))

    @classmethod
    def for_model(cls, model: Model, *, fixed_duration: bool = False, **options) -> DecodeConfig:
        """The options the entry points decode `model` with.

        The model's BOS / EOS (where `options` names none) and, when the model has a stop head,
        the stop logit: speech ends by itself and `max_frames` is the longest it may last.

        Args:
          model: the model (its `config.stop_head`, `bos_id`, `eos_id`).
          fixed_duration: ignore the stop head and generate exactly `max_frames` frames.
          **options: the other `DecodeConfig` fields (`max_frames`, `stop_threshold`, ...).
        """
        use_stop_logit = bool(model.config.stop_head) and not fixed_duration
        return cls(use_stop_logit=use_stop_logit, **options).with_model_ids(model)

    def static_key(self) -> DecodeConfig:
        """The options that change the compiled program (shapes, branches); the rest are traced."""
        return dataclasses.replace(
            self,
            temperature=float(self.temperature > 0),
            frame_temperature=1.0,
            top_k=int(self.top_k > 0),
            top_p=0.5 if self.top_p < 1.0 else 1.0,
            use_stop_logit=False,
            stop_threshold=0.5,
            seed=0,
            bos_id=None,
            eos_id=None,
        )

    def with_model_ids(self, model: Model) -> DecodeConfig:
        """These options with BOS / EOS taken from `model` where they are None.

        Raises:
          ValueError: an id is None here and the model defines none either.
        """
        ids = {}
        for name in ("bos_id", "eos_id"):
            value = getattr(self, name)
            ids[name] = getattr(model, name, None) if value is None else value
            if ids[name] is None:
                raise ValueError(f"DecodeConfig.{name} is None and the model defines no {name}")
        return dataclasses.replace(self, **ids)


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


def frame_noise_key(rng: jax.Array) -> jax.Array:
    """The `sample` stream key of a stochastic frame head, from a decode call's rng (group j of
    the continuation then draws from `fold_in(this, j)`: `nn.frame_heads.slot_noise`)."""
    return jax.random.fold_in(rng, 2**21)


def _decoder_chunk(module: Spectron, x, positions, mask):
    """float[B, T, D] embeddings -> hidden, written into the KV cache at its index."""
    return module.decoder(x, positions, mask, decode=True)


def _text_step(module: Spectron, tokens, positions, mask):
    """int32[B, 1] fed tokens -> float32[B, 1, V] logits of the next token."""
    hidden = module.decoder(module.decoder.embed(tokens), positions, mask, decode=True)
    return module.decoder.logits(hidden)


def _frame_step(module: Spectron, prev_groups, positions, mask, group_index=None, temperature=1.0):
    """float32[B, T, r*M] previous groups -> (next groups float32[B, T, r*M], stop or None).

    `group_index` int32[T]: the groups' indices in the continuation (the frame head's noise
    keys); `temperature`: the frame head's noise scale.
    """
    x = module.frame_inputs(prev_groups, deterministic=True)  # Pre-net dropout as configured.
    hidden = module.decoder(x, positions, mask, decode=True)
    return module.frame_outputs(hidden, group_index, temperature)


def _embed(module: Spectron, tokens):
    return module.decoder.embed(tokens)


def _logits(module: Spectron, hidden):
    return module.decoder.logits(hidden)


def _prefill_mask(valid: jax.Array, is_prefix: jax.Array, cache_length: int) -> jax.Array:
    """Prefix-LM mask of the first chunk, widened to the cache: bool[B, 1, T, S]."""
    mask = prefix_lm_mask(valid, is_prefix)
    return jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, cache_length - valid.shape[1])))


def _set_column(x: jax.Array, index: jax.Array, value: jax.Array) -> jax.Array:
    """x[:, index] = value for a traced index (out-of-range writes are dropped)."""
    return x.at[:, index].set(value.astype(x.dtype), mode="drop")


# ------------------------------------------------------------------------------------------------
# Loop states.
# ------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class CacheCursor:
    """The KV cache and where the next slot goes; shared by the text and the frame loop.

    Attributes:
      cache: the decoder's `cache` collection (keys / values of S = cache length slots).
      index: int32[] the next cache slot (the same for every row).
      key_valid: int32[B, S] 1 on the slots written valid so far (attention keys).
      next_pos: int32[B] the RoPE position of each row's next valid slot.
    """

    cache: PyTree
    index: jax.Array
    key_valid: jax.Array
    next_pos: jax.Array


@flax.struct.dataclass
class TextLoopState:
    """Carry of the text `while_loop`.

    Attributes:
      cursor: the cache after the tokens fed so far.
      tok: int32[B] the last sampled token (fed at the next step).
      done: bool[B] rows that emitted EOS or hit the limit (they feed invalid slots).
      tokens: int32[B, max_text_tokens] the sampled tokens, 0 after EOS.
      lengths: int32[B] tokens fed after BOS (= text length before EOS).
      k: int32[] the column the next sampled token goes to.
    """

    cursor: CacheCursor
    tok: jax.Array
    done: jax.Array
    tokens: jax.Array
    lengths: jax.Array
    k: jax.Array


@flax.struct.dataclass
class FrameLoopState:
    """Carry of the frame `while_loop` (G = r * n_mels values per frame group).

    Attributes:
      cursor: the cache after the text and the groups fed so far.
      prev: float32[B, G] the last generated group (the pre-net's next input).
      active: bool[B] rows still generating (not stopped by the stop logit).
      groups: float32[B, N, G] the generated groups, 0 where a row was not active.
      stop_probs: float32[B, N] sigmoid of the stop logit, 0 where not run.
      count: int32[B] groups generated per row.
      j: int32[] the next group's index.
    """

    cursor: CacheCursor
    prev: jax.Array
    active: jax.Array
    groups: jax.Array
    stop_probs: jax.Array
    count: jax.Array
    j: jax.Array


# ------------------------------------------------------------------------------------------------
# The compiled program.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Program:
    """What every phase of one traced `_generate` call shares (a trace-time closure, no pytree)."""

    module: Spectron
    options: DecodeConfig
    params: PyTree
    knobs: Mapping[str, jax.Array]
    sample_rng: jax.Array
    dropout_rng: jax.Array
    frame_noise_rng: jax.Array

    def apply(self, method, *args):
        """`method(module, *args)` without the cache."""
        return self.module.apply({"params": self.params}, *args, method=method)

    def apply_cached(self, cache, method, *args, rng=None):
        """`method(module, *args)` writing into `cache`: (output, updated cache)."""
        out, updated = self.module.apply(
            {"params": self.params, "cache": cache},
            *args,
            method=method,
            mutable=["cache"],
            rngs={
                "dropout": self.dropout_rng if rng is None else rng,
                "sample": self.frame_noise_rng,
            },
        )
        return out, updated["cache"]

    def step(self, cursor: CacheCursor, method, inputs, active, rng=None):
        """One slot at the cursor (valid for `active` rows): (output, advanced cursor).

        Args:
          inputs: [B, 1, ...] the slot's input to `method`.
          active: bool[B] rows whose slot is valid; the others write a masked-out slot and keep
            their position, like padding inside a training sequence.
        """
        return self.chunk(cursor, method, inputs, active[:, None], rng)

    def chunk(self, cursor: CacheCursor, method, inputs, valid, rng=None):
        """T slots at the cursor in one call (causal among themselves): (output, cursor).

        Args:
          inputs: [B, T, ...] the slots' input to `method`.
          valid: bool/int[B, T] slots that are real; an invalid one is masked out of attention
            and takes no position, like padding inside a training sequence.
        """
        valid = valid.astype(jnp.int32)
        t = valid.shape[1]
        cols = cursor.index + jnp.arange(t)
        key_valid = cursor.key_valid.at[:, cols].set(
            valid.astype(cursor.key_valid.dtype), mode="drop"
        )
        # A valid slot's position counts the valid slots before it (`cumsum(valid) - 1`).
        positions = cursor.next_pos[:, None] + jnp.cumsum(valid, axis=1) - valid
        out, cache = self.apply_cached(
            cursor.cache,
            method,
            inputs,
            positions,
            decode_mask(key_valid, cursor.index, t),
            rng=rng,
        )
        advanced = CacheCursor(
            cache=cache,
            index=cursor.index + t,
            key_valid=key_valid,
            next_pos=cursor.next_pos + jnp.sum(valid, axis=1).astype(cursor.next_pos.dtype),
        )
        return out, advanced


def _first_text(
    options: DecodeConfig, batch: Mapping[str, jax.Array], bos_id: jax.Array, b: int
) -> tuple[jax.Array, jax.Array, int]:
    """The text part of the prefill chunk: (tokens int32[B, T], valid int32[B, T], text slots).

    "forced" takes the batch's `[BOS] transcript` (T = L); otherwise it is BOS alone (T = 1),
    followed by one slot per generated token.
    """
    if options.text_mode == "forced":
        tokens = batch["decoder_input_tokens"].astype(jnp.int32)
        if "text_part" in batch:
            valid = (batch["text_part"] > 0).astype(jnp.int32)
        else:
            valid = (tokens != 0).astype(jnp.int32)
        return tokens, valid, tokens.shape[1]
    tokens = jnp.full((b, 1), bos_id, jnp.int32)
    valid = jnp.ones((b, 1), jnp.int32)
    # BOS, then every generated token but the last one (EOS, or the limit's last token, which is
    # still fed so that speech follows the whole text).
    return tokens, valid, 1 + options.max_text_tokens


def _num_groups(options: DecodeConfig, reduction_factor: int) -> int:
    """Frame groups to generate: N = ceil(max_frames / r), 0 for "text_only"."""
    return 0 if options.text_mode == "text_only" else ceil_div(options.max_frames, reduction_factor)


def _prefill(
    prog: _Program, batch: Mapping[str, jax.Array]
) -> tuple[jax.Array, CacheCursor, jax.Array, jax.Array]:
    """Encodes the prompt, creates the cache and runs `[prefix][first text]` in one chunk.

    Returns:
      (hidden float[B, P + T, D], cursor after the chunk, first text tokens int32[B, T] and
      their validity int32[B, T], see `_first_text`).
    """
    c = prog.module.config
    prefix, prefix_mask = prog.apply(
        Spectron.encode, batch["encoder_features"], batch["encoder_mask"]
    )
    b, p = prefix_mask.shape
    first_tokens, first_valid, text_slots = _first_text(
        prog.options, batch, prog.knobs["bos_id"], b
    )
    n_groups = _num_groups(prog.options, c.reduction_factor)
    cache_length = p + text_slots + (c.primer_groups + n_groups if n_groups else 0)
    cache = {"decoder": init_cache(Decoder(c.decoder), b, cache_length)}

    dtype = jnp.dtype(c.decoder.dtype)
    x = jnp.concatenate(
        [prefix.astype(dtype), prog.apply(_embed, first_tokens).astype(dtype)], axis=1
    )
    valid = jnp.concatenate([prefix_mask.astype(jnp.int32), first_valid], axis=1)
    is_prefix = jnp.zeros_like(valid).at[:, :p].set(prefix_mask)
    mask = _prefill_mask(valid, is_prefix, cache_length)
    hidden, cache = prog.apply_cached(cache, _decoder_chunk, x, positions_from_valid(valid), mask)
    cursor = CacheCursor(
        cache=cache,
        index=jnp.asarray(valid.shape[1], jnp.int32),
        key_valid=jnp.pad(valid, ((0, 0), (0, cache_length - valid.shape[1]))),
        next_pos=jnp.sum(valid, axis=-1),  # Position of each row's next valid slot.
    )
    return hidden, cursor, first_tokens, first_valid


def _forced_text(
    first_tokens: jax.Array, first_valid: jax.Array, max_text: int, eos_id: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The given transcript (inputs after BOS), EOS appended, cut to `max_text` tokens.

    Returns:
      (text_tokens int32[B, max_text], text_lengths int32[B]), shaped as free decoding's.
    """
    n_given = jnp.maximum(jnp.sum(first_valid, axis=-1) - 1, 0)
    given = jnp.pad(first_tokens[:, 1:], ((0, 0), (0, max_text + 1)))[:, :max_text]
    col = jnp.arange(max_text)[None, :]
    text_tokens = jnp.where(col < n_given[:, None], given, 0)
    text_tokens = jnp.where(col == n_given[:, None], eos_id, text_tokens).astype(jnp.int32)
    return text_tokens, jnp.minimum(n_given, max_text).astype(jnp.int32)


def _text_cond(prog: _Program, s: TextLoopState) -> jax.Array:
    return jnp.any(~s.done) & (s.k <= prog.options.max_text_tokens)


def _text_body(prog: _Program, s: TextLoopState) -> TextLoopState:
    """Feeds each active row's last token and samples the next one into column k."""
    active = ~s.done  # Rows whose last token is to be fed (not EOS, not past the limit).
    logits, cursor = prog.step(s.cursor, _text_step, s.tok[:, None], active)
    rng = jax.random.fold_in(prog.sample_rng, s.k)
    new = sample_tokens(rng, logits[:, 0], prog.options, prog.knobs)
    write = active & (s.k < prog.options.max_text_tokens)
    return TextLoopState(
        cursor=cursor,
        tok=new,
        done=s.done | ~write | (new == prog.knobs["eos_id"]),
        tokens=_set_column(s.tokens, s.k, jnp.where(write, new, 0)),
        lengths=s.lengths + active,
        k=s.k + 1,
    )


def _decode_text(
    prog: _Program, hidden: jax.Array, cursor: CacheCursor
) -> tuple[jax.Array, jax.Array, CacheCursor]:
    """Samples text after the prefill until every row emitted EOS or the limit.

    Args:
      hidden: float[B, P + 1, D] the prefill's output (its last slot, BOS, predicts token 0).
      cursor: the cache after the prefill.

    Returns:
      (text_tokens int32[B, max_text_tokens], text_lengths int32[B], cursor after the text).
    """
    b, max_text = hidden.shape[0], prog.options.max_text_tokens
    last_logits = prog.apply(_logits, hidden[:, -1:])[:, 0]
    tok = sample_tokens(
        jax.random.fold_in(prog.sample_rng, 0), last_logits, prog.options, prog.knobs
    )
    state = TextLoopState(
        cursor=cursor,
        tok=tok,
        done=tok == prog.knobs["eos_id"],
        tokens=jnp.zeros((b, max_text), jnp.int32).at[:, 0].set(tok),
        lengths=jnp.zeros((b,), jnp.int32),
        k=jnp.asarray(1, jnp.int32),
    )
    state = jax.lax.while_loop(
        functools.partial(_text_cond, prog), functools.partial(_text_body, prog), state
    )
    return state.tokens, state.lengths, state.cursor


def _frame_cond(s: FrameLoopState) -> jax.Array:
    return jnp.any(s.active) & (s.j < s.groups.shape[1])


def _frame_body(prog: _Program, s: FrameLoopState) -> FrameLoopState:
    """Feeds the previous group through the pre-net and writes the post-net's group j."""
    rng = jax.random.fold_in(prog.dropout_rng, s.j)
    step = functools.partial(
        _frame_step, group_index=s.j[None], temperature=prog.knobs["frame_temperature"]
    )
    (group, stop), cursor = prog.step(s.cursor, step, s.prev[:, None], s.active, rng)
    group = group[:, 0].astype(jnp.float32)
    groups = s.groups.at[:, s.j].set(jnp.where(s.active[:, None], group, 0.0))
    stop_probs, still = s.stop_probs, s.active
    if stop is not None:
        prob = jax.nn.sigmoid(stop[:, 0].astype(jnp.float32))
        stop_probs = stop_probs.at[:, s.j].set(jnp.where(s.active, prob, 0.0))
        # The stop target is 1 on the last group (losses.stop_targets): keep it, then stop.
        # Without use_stop_logit the threshold is +inf.
        still = s.active & ~(prob > prog.knobs["stop_threshold"])
    return FrameLoopState(
        cursor=cursor,
        prev=group,
        active=still,
        groups=groups,
        stop_probs=stop_probs,
        count=s.count + s.active,
        j=s.j + 1,
    )


def _feed_primer(
    prog: _Program, cursor: CacheCursor, batch: Mapping[str, jax.Array]
) -> tuple[CacheCursor, jax.Array]:
    """Writes the acoustic prompt's K / r slots in one chunk, as training lays them out.

    Returns:
      (the cursor after them, float32[B, r * n_mels] the last primer group: the pre-net input
      of the first generated group).
    """
    groups, valid = prog.apply(Spectron.primer, batch["encoder_features"], batch["encoder_mask"])
    # Its own dropout stream: the frame loop folds in the group index 0, 1, ...
    rng = jax.random.fold_in(prog.dropout_rng, prog.module.config.primer_groups + 2**20)
    _, advanced = prog.chunk(cursor, _frame_step, shift_groups(groups), valid, rng)
    return advanced, groups[:, -1].astype(jnp.float32)


def _frame_state(
    prog: _Program, cursor: CacheCursor, n_groups: int, prev: jax.Array | None = None
) -> FrameLoopState:
    """The frame loop's carry before group 0.

    Args:
      prev: float32[B, r * n_mels] the pre-net input of group 0 (the last primer group);
        None = zeros, as in training without a primer.
    """
    c = prog.module.config
    b, group_dim = cursor.next_pos.shape[0], c.reduction_factor * c.n_mels
    return FrameLoopState(
        cursor=cursor,
        prev=jnp.zeros((b, group_dim), jnp.float32) if prev is None else prev,
        active=jnp.ones((b,), bool),
        groups=jnp.zeros((b, n_groups, group_dim), jnp.float32),
        stop_probs=jnp.zeros((b, n_groups), jnp.float32),
        count=jnp.zeros((b,), jnp.int32),
        j=jnp.asarray(0, jnp.int32),
    )


def _run_frames(prog: _Program, state: FrameLoopState, until: jax.Array | None = None):
    """The frame loop from `state` until every row stopped, all groups are made or group
    `until` (exclusive; a traced int32) is reached: one call, or one chunk of a stream."""
    cond = _frame_cond if until is None else (lambda s: _frame_cond(s) & (s.j < until))
    return jax.lax.while_loop(cond, functools.partial(_frame_body, prog), state)


def _frame_outputs(prog: _Program, state: FrameLoopState) -> dict[str, jax.Array]:
    """`frames` float32[B, max_frames, n_mels], `frame_lengths` int32[B], `stopped` bool[B]
    (the stop logit ended the row; False for rows that ran to the end) and, with a stop head,
    `stop_probs` float32[B, n_groups]."""
    c = prog.module.config
    r, max_frames = c.reduction_factor, prog.options.max_frames
    out = {
        "frames": ungroup_frames(state.groups, c.n_mels)[:, :max_frames],
        "frame_lengths": jnp.minimum(state.count * r, max_frames).astype(jnp.int32),
        # A row is inactive at the end only if its stop fired (possibly on the last group).
        "stopped": ~state.active,
    }
    if c.stop_head:
        out["stop_probs"] = state.stop_probs
    return out


def _program(
    module: Spectron, options: DecodeConfig, params: PyTree, knobs: Mapping[str, jax.Array]
) -> _Program:
    """The trace-time closure; its rngs derive from `knobs["rng"]` alone, so every compiled
    phase of one stream rebuilds the same ones."""
    sample_rng, dropout_rng = jax.random.split(knobs["rng"])
    noise_rng = frame_noise_key(knobs["rng"])
    return _Program(module, options, params, knobs, sample_rng, dropout_rng, noise_rng)


def _text_then_frame_state(
    prog: _Program, batch: Mapping[str, jax.Array]
) -> tuple[dict[str, jax.Array], FrameLoopState | None]:
    """Prefill, the text phase and the primer: (text outputs, the frame loop's first carry, or
    None for "text_only")."""
    hidden, cursor, first_tokens, first_valid = _prefill(prog, batch)
    if prog.options.text_mode == "forced":
        tokens, lengths = _forced_text(
            first_tokens, first_valid, prog.options.max_text_tokens, prog.knobs["eos_id"]
        )
    else:
        tokens, lengths, cursor = _decode_text(prog, hidden, cursor)
    text = {"text_tokens": tokens, "text_lengths": lengths}
    n_groups = _num_groups(prog.options, prog.module.config.reduction_factor)
    if n_groups == 0:
        return text, None
    prev = None
    if prog.module.config.primer_frames:
        cursor, prev = _feed_primer(prog, cursor, batch)
    return text, _frame_state(prog, cursor, n_groups, prev)


def _generate(
    module: Spectron,
    options: DecodeConfig,
    params: PyTree,
    batch: Mapping[str, jax.Array],
    knobs: Mapping[str, jax.Array],
) -> dict[str, jax.Array]:
    """The traced program: prefill, then the text phase, then the frame phase (see `generate`)."""
    prog = _program(module, options, params, knobs)
    out, state = _text_then_frame_state(prog, batch)
    if state is None:
        b = out["text_tokens"].shape[0]
        out["frames"] = jnp.zeros((b, 0, module.config.n_mels), jnp.float32)
        out["frame_lengths"] = jnp.zeros((b,), jnp.int32)
        out["stopped"] = jnp.zeros((b,), bool)
        return out
    out.update(_frame_outputs(prog, _run_frames(prog, state)))
    return out


@functools.lru_cache(maxsize=32)
def _compiled(model_config: SpectronConfig, options: DecodeConfig, mesh: Mesh | None = None):
    """One jitted program per model config, static decode options and mesh (jit caches shapes).

    With a mesh `generate` calls it under the logical-axis rules and the mesh (set outside
    `jit`, as JAX requires), so the activations' and the KV cache's `with_logical_constraint`s
    shard them as in training.
    """
    del mesh  # Part of the cache key only: the trace under another mesh is another program.
    return jax.jit(functools.partial(_generate, Spectron(model_config), options))


def abstract_params(model: Model, mesh: Mesh) -> PyTree:
    """The parameters' `ShapeDtypeStruct`s, each with its `NamedSharding` from its logical axes
    and the one rules table (as the trainer places them)."""
    from spectron_jax.config import example_input_shapes

    shapes = example_input_shapes(model.config)
    rng = jax.random.PRNGKey(0)  # Made outside: no array can be made under abstract devices.
    with partitioning.axis_rules(mesh):
        boxed = jax.eval_shape(lambda rng: model.get_initial_variables(rng, shapes)["params"], rng)
    abstract = nn.unbox(boxed)
    shardings = partitioning.tree_shardings(abstract, partitioning.logical_specs(boxed), mesh)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def param_shardings(model: Model, mesh: Mesh) -> PyTree:
    """`NamedSharding` per parameter (see `abstract_params`)."""
    return jax.tree.map(lambda a: a.sharding, abstract_params(model, mesh))


def lower_generate(
    model: Model,
    inputs: Mapping[str, jax.ShapeDtypeStruct],
    config: DecodeConfig,
    mesh: Mesh,
) -> jax.stages.Lowered:
    """`generate`'s program lowered for abstract inputs on `mesh`, run nowhere (the AOT tool
    compiles it for TPU slices; `.compile()` on the result gives its memory and cost).

    Args:
      model: the model.
      inputs: shapes of `generate`'s batch: `encoder_features` [B, T_p, F], `encoder_mask`
        [B, T_p] (and, for text_mode "forced", `decoder_input_tokens` / `text_part`).
      config: decoding options (`max_text_tokens`, `max_frames`: the loop bounds).
      mesh: parameters, batch and KV cache placed as `generate(..., mesh=mesh)` places them.
    """
    config = config.with_model_ids(model)
    batch_sharding = partitioning.batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
        for k, v in inputs.items()
    }
    knobs = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=partitioning.replicated(mesh))
        for k, v in _knobs(config, None).items()
    }
    params = abstract_params(model, mesh)
    program = _compiled(model.config, config.static_key(), mesh)
    with partitioning.axis_rules(mesh):
        return program.lower(params, batch, knobs)


def _knobs(config: DecodeConfig, rng: jax.Array | None) -> dict[str, jax.Array]:
    """The traced options (`config` with its BOS / EOS resolved)."""
    return {
        "rng": jax.random.PRNGKey(config.seed) if rng is None else rng,
        "temperature": jnp.asarray(max(config.temperature, 1e-6), jnp.float32),
        "frame_temperature": jnp.asarray(config.frame_temperature, jnp.float32),
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


def _prepare(
    model: Model, batch: Mapping[str, Any], config: DecodeConfig
) -> tuple[DecodeConfig, dict[str, jax.Array]]:
    """Checks the batch against the options; (options with the model's BOS / EOS, the batch
    arrays the decode program reads)."""
    _check(model.config, batch, config)
    config = config.with_model_ids(model)
    keys = ["encoder_features", "encoder_mask"]
    if config.text_mode == "forced":
        keys += [k for k in ("decoder_input_tokens", "text_part") if k in batch]
    return config, {k: jnp.asarray(batch[k]) for k in keys}


def generate(
    model: Model,
    params: PyTree,
    batch: Mapping[str, Any],
    config: DecodeConfig,
    *,
    rng: jax.Array | None = None,
    mesh: Mesh | None = None,
) -> dict[str, jax.Array]:
    """Generates text, then speech, for a batch of prompts (one compiled program).

    Args:
      model: the model (`SpectronModel`): its `config` picks the network, its `bos_id` /
        `eos_id` are used where `config` leaves them None.
      params: its parameters (boxed or not).
      batch: `encoder_features` float32[B, T_p, F], `encoder_mask` int32[B, T_p]; for
        text_mode "forced" also `decoder_input_tokens` int32[B, L] (`[BOS] transcript`) and
        optionally `text_part` int32[B, L] (> 0 = valid; else tokens != 0 are valid).
      config: decoding options.
      rng: PRNG key of sampling and pre-net dropout; default `PRNGKey(config.seed)`.
      mesh: decode sharded over this mesh as training is: parameters by their logical axes,
        the batch (B a multiple of data x fsdp) and the KV cache over the batch axes, kv heads
        over `tensor`. None: wherever the arrays are (one device).

    Returns:
      `text_tokens` int32[B, max_text_tokens] (generated ids, EOS included, 0 after),
      `text_lengths` int32[B] (tokens before EOS), `frames` float32[B, max_frames, n_mels]
      (zeros after `frame_lengths`; [B, 0, n_mels] for "text_only"), `frame_lengths` int32[B],
      `stopped` bool[B] (the stop logit ended the row; False for a row that ran to the
      maximum without stopping); with a stop head also `stop_probs`
      float32[B, ceil(max_frames / r)] (0 where not run).
    """
    config, inputs = _prepare(model, batch, config)
    if mesh is not None:
        params = jax.device_put(nn.unbox(params), param_shardings(model, mesh))
        inputs = jax.device_put(inputs, partitioning.batch_sharding(mesh))
    program = _compiled(model.config, config.static_key(), mesh)
    if mesh is None:
        return program(params, inputs, _knobs(config, rng))
    with partitioning.axis_rules(mesh):
        return program(params, inputs, _knobs(config, rng))


# ------------------------------------------------------------------------------------------------
# Streaming: the same loop in chunks, the cache kept on device between them.
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _compiled_stream(model_config: SpectronConfig, options: DecodeConfig, chunk_groups: int):
    """(start, chunk) programs: `start(params, batch, knobs)` -> (text outputs, frame carry);
    `chunk(params, knobs, carry, until)` -> (carry after groups < until, float32[B,
    chunk_groups, G] the groups from min(the carry's j, N - chunk_groups) on: a dynamic slice
    is clamped to fit). The carry is donated: its KV cache is updated in place on the device
    instead of being copied per chunk."""
    module = Spectron(model_config)

    def start(params, batch, knobs):
        return _text_then_frame_state(_program(module, options, params, knobs), batch)

    def chunk(params, knobs, state, until):
        begin = state.j
        state = _run_frames(_program(module, options, params, knobs), state, until)
        groups = jax.lax.dynamic_slice_in_dim(state.groups, begin, chunk_groups, axis=1)
        return state, groups

    return jax.jit(start), jax.jit(chunk, donate_argnums=(2,))


def stream(
    model: Model,
    params: PyTree,
    batch: Mapping[str, Any],
    config: DecodeConfig,
    *,
    chunk_groups: int = 4,
    rng: jax.Array | None = None,
) -> Iterator[dict[str, Any]]:
    """`generate`, yielding the speech while it is made: the text first, then frame chunks.

    The frame loop runs `chunk_groups` groups per compiled call; between calls its carry (the
    KV cache, the last group, the stop state) stays on the device. The chunks put together are
    `generate`'s frames (same loop body, same per-group rngs).

    Args:
      model, params, batch, config, rng: as `generate` (one device; no mesh).
      chunk_groups: frame groups per chunk (r * chunk_groups frames).

    Yields:
      First {"text_tokens": int32[B, max_text_tokens], "text_lengths": int32[B]} (numpy), then
      per chunk {"frames": float32[B, n, n_mels] the chunk's frames (n <= r * chunk_groups;
      zeros for rows that have stopped), "start": the index of its first frame,
      "frame_lengths": int32[B] frames per row so far, "stopped": bool[B]}; the last chunk ends
      at `max_frames` or where every row has stopped.
    """
    if chunk_groups < 1:
        raise ValueError(f"chunk_groups={chunk_groups} must be >= 1")
    config, inputs = _prepare(model, batch, config)
    knobs = _knobs(config, rng)
    r = model.config.reduction_factor
    chunk_groups = max(1, min(chunk_groups, _num_groups(config, r)))  # The slice must fit.
    start, chunk = _compiled_stream(model.config, config.static_key(), chunk_groups)
    text, state = start(params, inputs, knobs)
    yield jax.device_get(text)
    if state is None:
        return
    n_groups, begin = state.groups.shape[1], 0
    while begin < n_groups:
        until = min(begin + chunk_groups, n_groups)
        state, groups = chunk(params, knobs, state, jnp.asarray(until, jnp.int32))
        end = int(state.j)  # Fewer than `until` when every row has stopped.
        offset = begin - max(0, min(begin, n_groups - chunk_groups))  # The clamp of the slice.
        made = np.asarray(jax.device_get(groups))[:, offset : offset + end - begin]  # [B,n,r*M]
        frames = made.reshape(made.shape[0], -1, model.config.n_mels)  # [B, n*r, M]
        frames = frames[:, : max(0, config.max_frames - begin * r)]
        count = jax.device_get(state.count)
        yield {
            "frames": frames,
            "start": begin * r,
            "frame_lengths": np.minimum(count * r, config.max_frames).astype(np.int32),
            "stopped": ~jax.device_get(state.active),
        }
        if end < until or not jax.device_get(state.active).any():
            return
        begin = end


def predict_batch_with_aux(
    model: Model,
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
    n_groups = ceil_div(max_frames, r)

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
                rngs={"dropout": jax.random.fold_in(rng, j), "sample": frame_noise_key(rng)},
            )
            return groups.at[:, j].set(group_frames(pred, r)[:, j])

        groups = jnp.zeros((b, n_groups, r * n_mels), jnp.float32)
        groups = jax.lax.fori_loop(0, n_groups, body, groups)
        return ungroup_frames(groups, n_mels)[:, :max_frames]

    return jax.jit(fn)


def generate_frames_uncached(
    model: Model,
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
    "stream",
]
