"""Spectron's training objective: one transcript cross-entropy plus the spectrogram terms.

`L = w_ce * CE + w_s * L_s + w_f * L_f + w_t * L_t (+ w_stop * stop BCE) (+ z-loss)`, where every
spectrogram term is L1 + L2 (the paper's "Training objective" section):

- `L_s`: the predicted frames against the target frames;
- `L_f`: first-order deltas along the mel (feature) axis, `x[t, m+1] - x[t, m]`;
- `L_t`: time deltas of order k = 1..K, summed over k. By default (`time_delta_kind="lag"`) the
  order-k delta is the lag-k difference `x[t+k] - x[t]`, our reading of the paper's
  `x[1:T-k] - x[k:T]`; `"finite_difference"` uses the k-th order finite difference instead.

Means run over valid (unpadded) frames only: a delta counts only where every frame it spans is
valid, so padding never contributes and changing padded values changes nothing. The CE is a mean
over valid text targets (one CE over prompt transcript and continuation: the paper needs no
alignment). Every weight and K are knobs (`LossConfig`) so the paper's ablations can be rerun.

The optional end-of-speech head (not in the paper) is a logit per frame group, trained with a
binary cross-entropy whose one positive per example, the last valid group, is weighted by
`stop_pos_weight`: against tens to hundreds of negative groups an unweighted head learns to
never fire. Decoding keeps the group whose probability first crosses its threshold and stops
after it, which is what the target asks for (`stop_targets`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from spectron_jax.nn.frame_heads import FrameHeadConfig

TIME_DELTA_KINDS = ("lag", "finite_difference")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms. Paper defaults: every weight 1.0, K = 3."""

    ce_weight: float = 1.0
    spec_weight: float = 1.0  # L_s
    freq_delta_weight: float = 1.0  # L_f
    time_delta_weight: float = 1.0  # L_t
    time_delta_orders: int = 3  # K: L_t sums orders 1..K.
    time_delta_kind: str = "lag"  # "lag": x[t+k] - x[t]; "finite_difference": k-th difference.
    l1_weight: float = 1.0  # Each spectrogram term is l1_weight * L1 + l2_weight * L2.
    l2_weight: float = 1.0
    stop_weight: float = 1.0  # Used only when the model has an end-of-speech head.
    # Weight of the positive (last valid group) in the stop BCE; 1 = unweighted. A head that is
    # to fire needs ~20-100 (one positive per utterance against that many negative groups).
    stop_pos_weight: float = 1.0
    z_loss: float = 0.0  # Weight of log(Z)^2 on the text logits (PaLM); 0 disables.
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.time_delta_orders < 0:
            raise ValueError(f"time_delta_orders={self.time_delta_orders} must be >= 0")
        if self.time_delta_kind not in TIME_DELTA_KINDS:
            raise ValueError(f"time_delta_kind={self.time_delta_kind!r} not in {TIME_DELTA_KINDS}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.stop_pos_weight <= 0.0:
            raise ValueError(f"stop_pos_weight={self.stop_pos_weight} must be > 0")


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, 0 where den == 0 (a batch with no valid frames, e.g. spoken QA)."""
    return jnp.where(den > 0, num / jnp.maximum(den, 1e-12), 0.0)


# ------------------------------------------------------------------------------------------------
# Text.
# ------------------------------------------------------------------------------------------------


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Token cross-entropy, per token.

    Args:
      logits: float[B, L, V] (computed in float32).
      targets: int32[B, L].
      weights: float32[B, L], 1 on valid targets.
      z_loss: weight of log(Z)^2, which keeps the softmax normaliser near 1.
      label_smoothing: mass spread uniformly over the vocabulary.

    Returns:
      (ce float32[B, L], z float32[B, L], correct float32[B, L]): weighted per-token CE, weighted
      z-loss term and weighted argmax correctness; sum and divide by `weights.sum()` for means.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    # Pick the target from the logits, not from a materialised log-softmax: the gradient of the
    # gather is then a sparse add beside softmax's, which XLA:CPU runs ~1.5x faster at V=8192
    # (benchmarks/train_step.py profile, docs/PERFORMANCE.md).
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
    nll = log_z - target_logit[..., 0]
    if label_smoothing > 0.0:
        mean_log_prob = jnp.mean(logits, axis=-1) - log_z
        nll = (1.0 - label_smoothing) * nll - label_smoothing * mean_log_prob
    weights = weights.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return nll * weights, z_loss * jnp.square(log_z) * weights, correct * weights


# ------------------------------------------------------------------------------------------------
# Spectrogram terms.
# ------------------------------------------------------------------------------------------------


def l1_l2(
    pred: jax.Array, target: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masked L1 and L2 means over valid rows.

    Args:
      pred, target: float[B, T, M].
      mask: [B, T], nonzero on valid rows.

    Returns:
      (l1, l2, count): mean |pred - target| and mean (pred - target)^2 over valid rows and the M
      columns (each element counts once), and the number of valid rows.
    """
    m = (mask > 0).astype(jnp.float32)
    diff = (pred.astype(jnp.float32) - target.astype(jnp.float32)) * m[..., None]
    count = jnp.sum(m)
    elems = count * pred.shape[-1]
    return _safe_div(jnp.sum(jnp.abs(diff)), elems), _safe_div(jnp.sum(diff**2), elems), count


def time_delta(
    x: jax.Array, mask: jax.Array, order: int, kind: str = "lag"
) -> tuple[jax.Array, jax.Array]:
    """Order-k time delta and the mask of where it is defined.

    Args:
      x: float[B, T, M].
      mask: [B, T].
      order: k >= 1.
      kind: "lag" (`x[t+k] - x[t]`) or "finite_difference" (k-th order difference).

    Returns:
      (delta float[B, T-k, M], mask float32[B, T-k]): `delta[t]` spans frames t..t+k and is valid
      only where all k+1 of them are valid.
    """
    m = (mask > 0).astype(jnp.float32)
    x = x.astype(jnp.float32)
    t = x.shape[1]
    span = m[:, : t - order]
    for i in range(1, order + 1):
        span = span * m[:, i : t - order + i]
    if kind == "lag":
        return x[:, order:] - x[:, : t - order], span
    if kind != "finite_difference":
        raise ValueError(f"time delta kind {kind!r} not in {TIME_DELTA_KINDS}")
    for _ in range(order):
        x = x[:, 1:] - x[:, :-1]
    return x, span


def freq_delta(x: jax.Array) -> jax.Array:
    """First-order difference along the mel axis: float[B, T, M] -> float[B, T, M-1]."""
    x = x.astype(jnp.float32)
    return x[..., 1:] - x[..., :-1]


def spectrogram_losses(
    pred: jax.Array, target: jax.Array, frame_mask: jax.Array, config: LossConfig
) -> dict[str, jax.Array]:
    """The three regression terms, each `l1_weight * L1 + l2_weight * L2`.

    Args:
      pred, target: float[B, T, n_mels] predicted and target log-mel frames.
      frame_mask: [B, T], nonzero on valid frames.
      config: weights and K.

    Returns:
      Scalars: `spec`, `freq_delta`, `time_delta` (the combined L1 + L2 of each term; L_t summed
      over orders 1..K), their `*_l1` / `*_l2` parts, `time_delta_k` per order and `num_frames`.
    """
    out = {}

    def combine(name, l1, l2):
        out[f"{name}_l1"], out[f"{name}_l2"] = l1, l2
        out[name] = config.l1_weight * l1 + config.l2_weight * l2

    l1, l2, count = l1_l2(pred, target, frame_mask)
    combine("spec", l1, l2)
    out["num_frames"] = count
    if pred.shape[-1] > 1:
        l1, l2, _ = l1_l2(freq_delta(pred), freq_delta(target), frame_mask)
    else:
        l1 = l2 = jnp.zeros((), jnp.float32)
    combine("freq_delta", l1, l2)
    t_l1 = t_l2 = jnp.zeros((), jnp.float32)
    for k in range(1, config.time_delta_orders + 1):
        if pred.shape[1] <= k:
            break  # No k-th difference fits in the sequence.
        dp, m = time_delta(pred, frame_mask, k, config.time_delta_kind)
        dt, _ = time_delta(target, frame_mask, k, config.time_delta_kind)
        l1, l2, _ = l1_l2(dp, dt, m)
        out[f"time_delta_{k}"] = config.l1_weight * l1 + config.l2_weight * l2
        t_l1, t_l2 = t_l1 + l1, t_l2 + l2
    combine("time_delta", t_l1, t_l2)
    return out


def stop_targets(frame_mask: jax.Array, reduction_factor: int) -> tuple[jax.Array, jax.Array]:
    """End-of-speech targets per frame group.

    Args:
      frame_mask: [B, T_f], T_f a multiple of `reduction_factor`.
      reduction_factor: frames per group (decoder slot).

    Returns:
      (targets float32[B, N], group_mask float32[B, N]): 1 on the last valid group (the slot that
      predicts the final frames), 0 on earlier valid groups; `group_mask` marks groups with any
      valid frame.
    """
    b, t = frame_mask.shape
    groups = (frame_mask > 0).reshape(b, t // reduction_factor, reduction_factor)
    group_mask = jnp.any(groups, axis=-1).astype(jnp.float32)
    n = jnp.sum(group_mask, axis=-1, keepdims=True)
    idx = jnp.arange(group_mask.shape[1])[None, :]
    return (idx == n - 1).astype(jnp.float32) * group_mask, group_mask


def stop_loss(
    logits: jax.Array, targets: jax.Array, mask: jax.Array, pos_weight: float = 1.0
) -> jax.Array:
    """Binary cross-entropy with a weighted positive class, mean over valid groups.

    Per group `-(pos_weight * y * log(sigmoid(x)) + (1 - y) * log(1 - sigmoid(x)))`, summed over
    `mask` and divided by the number of valid groups (not by the weights: pos_weight = 1 is the
    plain BCE mean, and the weight only scales the positives' share).

    Args:
      logits: float[B, N] stop logits per frame group.
      targets: float32[B, N] 1 on the last valid group (`stop_targets`).
      mask: float32[B, N] 1 on valid groups.
      pos_weight: weight of the positive terms.

    Returns:
      float32[] (0 for a batch without valid groups).
    """
    logits = logits.astype(jnp.float32)
    # -log(sigmoid(x)) = softplus(-x) and -log(1 - sigmoid(x)) = softplus(x), in stable form.
    log1p_exp = jnp.log1p(jnp.exp(-jnp.abs(logits)))
    neg_log_p = jnp.maximum(-logits, 0) + log1p_exp
    neg_log_not_p = jnp.maximum(logits, 0) + log1p_exp
    bce = pos_weight * targets * neg_log_p + (1.0 - targets) * neg_log_not_p
    return _safe_div(jnp.sum(bce * mask), jnp.sum(mask))


def stop_metrics(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """How the stop head would end each example, at decoding's default threshold 0.5.

    A group "fires" when its logit is > 0 (sigmoid > 0.5). Teacher forcing only runs the valid
    groups, so a row that never fires counts as firing one group past its last valid one (a
    lower bound of how late decoding would stop).

    Args:
      logits: float[B, N]; targets, mask: float32[B, N] from `stop_targets`.

    Returns:
      Scalars: `stop_precision` (fired groups that are the last one), `stop_recall` (last groups
      that fire), `stop_position_error` (mean |first fired group - last valid group| over rows
      with valid groups, in groups) and `stop_position_bias` (its signed mean: > 0 = late).
    """
    valid = mask > 0
    fired = (logits > 0) & valid
    positive = (targets > 0) & valid
    hits = jnp.sum((fired & positive).astype(jnp.float32))
    n = jnp.sum(valid, axis=-1)  # Valid groups per row; they come first.
    idx = jnp.arange(logits.shape[-1])[None, :]
    # `initial` (never below n) makes the min defined when there are no groups (spoken QA).
    first = jnp.min(jnp.where(fired, idx, n[:, None]), axis=-1, initial=logits.shape[-1])
    error = (first - (n - 1)).astype(jnp.float32)
    rows = (n > 0).astype(jnp.float32)
    return {
        "stop_precision": _safe_div(hits, jnp.sum(fired.astype(jnp.float32))),
        "stop_recall": _safe_div(hits, jnp.sum(positive.astype(jnp.float32))),
        "stop_position_error": _safe_div(jnp.sum(jnp.abs(error) * rows), jnp.sum(rows)),
        "stop_position_bias": _safe_div(jnp.sum(error * rows), jnp.sum(rows)),
    }


# ------------------------------------------------------------------------------------------------
# Stochastic frame heads (nn/frame_heads.py).
# ------------------------------------------------------------------------------------------------


def gaussian_kl(
    mean: jax.Array, log_var: jax.Array, target: jax.Array, mask: jax.Array
) -> jax.Array:
    """KL(N(mean, exp(log_var)) || N(target, 1)) per value, mean over valid rows' values.

    Per value `0.5 * (exp(log_var) + (mean - target)^2 - 1 - log_var)` (MELLE's latent term).

    Args:
      mean, log_var, target: float[B, T, M]; mask: [B, T] nonzero on valid rows.

    Returns:
      float32[] (0 without valid rows).
    """
    m = (mask > 0).astype(jnp.float32)[..., None]
    mean, log_var = mean.astype(jnp.float32), log_var.astype(jnp.float32)
    kl = 0.5 * (jnp.exp(log_var) + jnp.square(mean - target.astype(jnp.float32)) - 1.0 - log_var)
    return _safe_div(jnp.sum(kl * m), jnp.sum(m) * mean.shape[-1])


def spectrogram_flux(mean: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """MELLE's flux term: `-mean |mean[t] - target[t - 1]|` over rows t where t and t - 1 are
    valid. Negative: lower is more change between consecutive frames (against over-smoothing).

    Args:
      mean, target: float[B, T, M]; mask: [B, T].
    """
    m = (mask > 0).astype(jnp.float32)
    pair = (m[:, 1:] * m[:, :-1])[..., None]
    diff = jnp.abs(mean[:, 1:].astype(jnp.float32) - target[:, :-1].astype(jnp.float32))
    return -_safe_div(jnp.sum(diff * pair), jnp.sum(pair) * mean.shape[-1])


def energy_score(samples: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """The energy score (a proper scoring rule; SLED's loss), mean over valid slots.

    Per slot `mean_i ||x_i - y|| - mean_{i != j} ||x_i - x_j|| / 2` with Euclidean norms over
    the values of a slot: minimised in expectation when the samples come from the target's
    distribution.

    Args:
      samples: float[S, B, N, G], S >= 2 draws per slot; target: float[B, N, G]; mask: [B, N].
    """
    x = samples.astype(jnp.float32)
    s = x.shape[0]
    fit = jnp.mean(_norm(x - target.astype(jnp.float32)[None]), axis=0)
    pairs = _norm(x[:, None] - x[None, :])  # [S, S, B, N]; the diagonal is 0.
    spread = jnp.sum(pairs, axis=(0, 1)) / (s * (s - 1))
    m = (mask > 0).astype(jnp.float32)
    return _safe_div(jnp.sum((fit - 0.5 * spread) * m), jnp.sum(m))


def energy_distance(x: jax.Array, y: jax.Array) -> jax.Array:
    """Sample energy distance `2 E||X - Y|| - E||X - X'|| - E||Y - Y'||` of float[n, G] and
    float[m, G] draws (V-statistic, so ~0 for two samples of one distribution, > 0 otherwise)."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    xy = jnp.mean(_norm(x[:, None] - y[None, :]))
    xx = jnp.mean(_norm(x[:, None] - x[None, :]))
    yy = jnp.mean(_norm(y[:, None] - y[None, :]))
    return 2.0 * xy - xx - yy


def _norm(x: jax.Array) -> jax.Array:
    """Euclidean norm over the last axis, with a finite gradient at 0."""
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=-1) + 1e-12)


def frame_head_losses(
    head: FrameHeadConfig,
    outputs: Mapping[str, jax.Array],
    target_frames: jax.Array,
    frame_mask: jax.Array,
    config: LossConfig,
    reduction_factor: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The terms a stochastic head adds to (or, for energy_distance, puts in place of) the
    regression terms.

    Args:
      head: the head's config (kind and weights).
      outputs: the head's outputs on the continuation slots (`nn.frame_heads`), [B, N, G] each.
      target_frames: float[B, T_f, M]; frame_mask: [B, T_f].
      config: the loss config (L1 / L2 weights of the latent's regression).
      reduction_factor: frames per group.

    Returns:
      (the weighted sum float32[], its unweighted terms: gaussian `latent`, `kl`, `flux`;
      energy_distance `energy`).
    """
    n_mels = target_frames.shape[-1]
    if head.kind == "gaussian":
        ungroup = lambda g: g.reshape(g.shape[0], -1, n_mels)  # noqa: E731 - [B,N,r*M]->[B,T,M]
        l1, l2, _ = l1_l2(ungroup(outputs["latent"]), target_frames, frame_mask)
        terms = {
            "latent": config.l1_weight * l1 + config.l2_weight * l2,
            "kl": gaussian_kl(
                ungroup(outputs["mean"]), ungroup(outputs["log_var"]), target_frames, frame_mask
            ),
            "flux": spectrogram_flux(ungroup(outputs["mean"]), target_frames, frame_mask),
        }
        weighted = (
            head.latent_weight * terms["latent"]
            + head.kl_weight * terms["kl"]
            + head.flux_weight * terms["flux"]
        )
        return weighted, terms
    if head.kind == "energy_distance":
        b, t, _ = target_frames.shape
        groups = target_frames.reshape(b, t // reduction_factor, reduction_factor * n_mels)
        mask = jnp.any((frame_mask > 0).reshape(b, -1, reduction_factor), axis=-1)
        terms = {"energy": energy_score(outputs["samples"], groups, mask)}
        return head.energy_weight * terms["energy"], terms
    return jnp.zeros((), jnp.float32), {}


# ------------------------------------------------------------------------------------------------
# The total.
# ------------------------------------------------------------------------------------------------


def spectron_loss(
    *,
    logits: jax.Array,
    target_tokens: jax.Array,
    loss_weights: jax.Array,
    text_part: jax.Array,
    pred_frames: jax.Array,
    target_frames: jax.Array,
    frame_mask: jax.Array,
    config: LossConfig,
    stop_logits: jax.Array | None = None,
    reduction_factor: int = 1,
    frame_head: FrameHeadConfig | None = None,
    head_outputs: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted total and its metrics.

    Args:
      logits: float[B, L, V] text logits on the text slots.
      target_tokens: int32[B, L].
      loss_weights: float32[B, L].
      text_part: int32[B, L]: 1 prompt transcript, 2 continuation (and EOS), 0 pad.
      pred_frames, target_frames: float[B, T_f, n_mels].
      frame_mask: int32[B, T_f].
      config: weights.
      stop_logits: float[B, N] end-of-speech logits per frame group, or None (no stop head).
      reduction_factor: frames per group, for the stop targets.
      frame_head: the frame head's config; None = regression.
      head_outputs: a stochastic head's outputs (`frame_head_losses`); their terms join the
        loss. The energy_distance head is trained by its energy score alone: the regression
        terms are then reported (on its first sample) but not added.

    Returns:
      (loss float32[], metrics): metrics are float32 scalars, batch means, each term unweighted
      (`ce`, `spec`, `freq_delta`, `time_delta`, ... and `loss`), token accuracies
      `accuracy_prompt` / `accuracy_continuation` / `accuracy`, and counts `num_tokens`,
      `num_frames`; with `stop_logits` also `stop` (the weighted BCE) and the figures of
      `stop_metrics`.
    """
    nll, z, correct = cross_entropy(
        logits,
        target_tokens,
        loss_weights,
        z_loss=config.z_loss,
        label_smoothing=config.label_smoothing,
    )
    w = loss_weights.astype(jnp.float32)
    num_tokens = jnp.sum(w)
    metrics = {"ce": _safe_div(jnp.sum(nll), num_tokens), "num_tokens": num_tokens}
    metrics["z_loss"] = _safe_div(jnp.sum(z), num_tokens)
    metrics["accuracy"] = _safe_div(jnp.sum(correct), num_tokens)
    for part, name in ((1, "prompt"), (2, "continuation")):
        pw = w * (text_part == part)
        metrics[f"accuracy_{name}"] = _safe_div(jnp.sum(correct * (text_part == part)), jnp.sum(pw))
        metrics[f"num_tokens_{name}"] = jnp.sum(pw)

    metrics.update(spectrogram_losses(pred_frames, target_frames, frame_mask, config))
    regression = (
        config.spec_weight * metrics["spec"]
        + config.freq_delta_weight * metrics["freq_delta"]
        + config.time_delta_weight * metrics["time_delta"]
    )
    loss = config.ce_weight * metrics["ce"] + metrics["z_loss"]
    kind = frame_head.kind if frame_head is not None else "regression"
    if kind != "energy_distance":
        loss = loss + regression
    if kind != "regression":
        weighted, terms = frame_head_losses(
            frame_head, head_outputs, target_frames, frame_mask, config, reduction_factor
        )
        metrics.update(terms)
        loss = loss + weighted
    if stop_logits is not None:
        targets, group_mask = stop_targets(frame_mask, reduction_factor)
        metrics["stop"] = stop_loss(stop_logits, targets, group_mask, config.stop_pos_weight)
        metrics.update(stop_metrics(stop_logits, targets, group_mask))
        loss = loss + config.stop_weight * metrics["stop"]
    metrics["loss"] = loss
    return loss, metrics
