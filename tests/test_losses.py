"""Loss terms against a numpy reference written here, loop by loop, on hand-made arrays."""

import math

import numpy as np
import pytest

from spectron_jax import losses


def ref_l1_l2_terms(pred, target, mask, orders, kind="lag"):
    """Plain-loop reference: lists of per-element |d| and d^2 for each term."""
    b, t, m = pred.shape
    terms = {"spec": [], "freq": [], **{f"t{k}": [] for k in range(1, orders + 1)}}
    for i in range(b):
        for j in range(t):
            if not mask[i, j]:
                continue
            terms["spec"] += list(pred[i, j] - target[i, j])
            dp = np.diff(pred[i, j])
            dt = np.diff(target[i, j])
            terms["freq"] += list(dp - dt)
        for k in range(1, orders + 1):
            for j in range(t - k):
                if not all(mask[i, j : j + k + 1]):
                    continue
                if kind == "lag":
                    coef = np.zeros(k + 1)
                    coef[[0, k]] = -1, 1
                else:  # k-th order finite difference spanning frames j..j+k (binomial form).
                    coef = np.array([(-1) ** (k - n) * math.comb(k, n) for n in range(k + 1)])
                dp = coef @ pred[i, j : j + k + 1]
                dt = coef @ target[i, j : j + k + 1]
                terms[f"t{k}"] += list(dp - dt)
    return {
        key: (np.mean(np.abs(v)) if v else 0.0, np.mean(np.square(v)) if v else 0.0)
        for key, v in terms.items()
    }


def make_frames(seed=0, b=3, t=9, m=5):
    rng = np.random.default_rng(seed)
    pred = rng.normal(size=(b, t, m)).astype(np.float32)
    target = rng.normal(size=(b, t, m)).astype(np.float32)
    mask = np.zeros((b, t), np.int32)
    mask[0, :] = 1
    mask[1, :4] = 1
    if b > 2:
        mask[2, :1] = 1  # One frame: no time delta is defined.
    return pred, target, mask


@pytest.mark.parametrize("kind", losses.TIME_DELTA_KINDS)
@pytest.mark.parametrize("orders", [0, 1, 3, 5])
def test_spectrogram_terms_match_numpy(orders, kind):
    pred, target, mask = make_frames()
    cfg = losses.LossConfig(
        time_delta_orders=orders, time_delta_kind=kind, l1_weight=0.7, l2_weight=1.3
    )
    got = losses.spectrogram_losses(pred, target, mask, cfg)
    ref = ref_l1_l2_terms(pred, target, mask, orders, kind)
    np.testing.assert_allclose(got["spec_l1"], ref["spec"][0], rtol=1e-5)
    np.testing.assert_allclose(got["spec_l2"], ref["spec"][1], rtol=1e-5)
    np.testing.assert_allclose(got["spec"], 0.7 * ref["spec"][0] + 1.3 * ref["spec"][1], rtol=1e-5)
    np.testing.assert_allclose(got["freq_delta_l1"], ref["freq"][0], rtol=1e-5)
    np.testing.assert_allclose(got["freq_delta_l2"], ref["freq"][1], rtol=1e-5)
    t_l1 = sum(ref[f"t{k}"][0] for k in range(1, orders + 1))
    t_l2 = sum(ref[f"t{k}"][1] for k in range(1, orders + 1))
    np.testing.assert_allclose(got["time_delta_l1"], t_l1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["time_delta_l2"], t_l2, rtol=1e-5, atol=1e-7)
    for k in range(1, orders + 1):
        np.testing.assert_allclose(
            got[f"time_delta_{k}"], 0.7 * ref[f"t{k}"][0] + 1.3 * ref[f"t{k}"][1], rtol=1e-5
        )
    assert float(got["num_frames"]) == mask.sum()


@pytest.mark.parametrize("kind", losses.TIME_DELTA_KINDS)
def test_padding_never_contributes(kind):
    pred, target, mask = make_frames()
    cfg = losses.LossConfig(time_delta_kind=kind)
    base = losses.spectrogram_losses(pred, target, mask, cfg)
    rng = np.random.default_rng(1)
    pad = mask[..., None] == 0
    pred2 = np.where(pad, rng.normal(size=pred.shape) * 100, pred).astype(np.float32)
    target2 = np.where(pad, rng.normal(size=pred.shape) * 100, target).astype(np.float32)
    other = losses.spectrogram_losses(pred2, target2, mask, cfg)
    for key in base:
        np.testing.assert_array_equal(np.asarray(base[key]), np.asarray(other[key]), err_msg=key)


def test_perfect_prediction_and_empty_mask_are_zero():
    pred, _, mask = make_frames()
    out = losses.spectrogram_losses(pred, pred, mask, losses.LossConfig())
    for key in ("spec", "freq_delta", "time_delta"):
        assert float(out[key]) == 0.0
    # No valid frame at all (spoken QA has T_c = 0 frames): zeros, not NaN.
    out = losses.spectrogram_losses(pred, pred + 1, np.zeros_like(mask), losses.LossConfig())
    for key in ("spec", "freq_delta", "time_delta"):
        assert float(out[key]) == 0.0


def ref_text(logits, targets, weights, text_part, z_loss):
    b, n, _ = logits.shape
    nll, zs, acc = [], [], {0: [], 1: [], 2: []}
    for i in range(b):
        for j in range(n):
            if weights[i, j] == 0:
                continue
            row = logits[i, j].astype(np.float64)
            lz = np.log(np.sum(np.exp(row - row.max()))) + row.max()
            nll.append(lz - row[targets[i, j]])
            zs.append(z_loss * lz**2)
            ok = float(np.argmax(row) == targets[i, j])
            acc[0].append(ok)
            acc[text_part[i, j]].append(ok)
    return np.mean(nll), np.mean(zs), {k: np.mean(v) for k, v in acc.items()}


def make_text(seed=0, b=2, n=7, v=11):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, n, v)).astype(np.float32) * 3
    targets = rng.integers(0, v, size=(b, n)).astype(np.int32)
    # Make a few predictions right, so accuracies are not trivially 0.
    logits[0, 1, targets[0, 1]] += 20
    logits[1, 4, targets[1, 4]] += 20
    text_part = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 2, 2, 0]], np.int32)
    weights = (text_part > 0).astype(np.float32)
    return logits, targets, weights, text_part


def test_total_loss_matches_reference_and_weights():
    logits, targets, weights, text_part = make_text()
    pred, target, mask = make_frames(b=2, t=8)
    cfg = losses.LossConfig(
        ce_weight=0.5,
        spec_weight=2.0,
        freq_delta_weight=3.0,
        time_delta_weight=0.25,
        time_delta_orders=2,
        z_loss=1e-2,
    )
    loss, metrics = losses.spectron_loss(
        logits=logits,
        target_tokens=targets,
        loss_weights=weights,
        text_part=text_part,
        pred_frames=pred,
        target_frames=target,
        frame_mask=mask,
        config=cfg,
    )
    ce, z, acc = ref_text(logits, targets, weights, text_part, 1e-2)
    np.testing.assert_allclose(metrics["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["z_loss"], z, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], acc[0], rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy_prompt"], acc[1], rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy_continuation"], acc[2], rtol=1e-6)
    assert acc[1] != acc[2]  # The hand-made batch tells the two parts apart.
    ref = ref_l1_l2_terms(pred, target, mask, 2)
    spec = sum(ref["spec"])
    freq = sum(ref["freq"])
    time = sum(ref["t1"]) + sum(ref["t2"])
    expected = 0.5 * ce + z + 2.0 * spec + 3.0 * freq + 0.25 * time
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)

    # Padded text positions (weight 0) never matter, whatever their logits and targets.
    logits2 = np.where((weights == 0)[..., None], 1e3, logits).astype(np.float32)
    targets2 = np.where(weights == 0, 3, targets).astype(np.int32)
    loss2, _ = losses.spectron_loss(
        logits=logits2,
        target_tokens=targets2,
        loss_weights=weights,
        text_part=text_part,
        pred_frames=pred,
        target_frames=target,
        frame_mask=mask,
        config=cfg,
    )
    assert float(loss2) == float(loss)


def test_ablation_weights_remove_terms():
    logits, targets, weights, text_part = make_text()
    pred, target, mask = make_frames(b=2, t=8)
    kw = dict(
        logits=logits,
        target_tokens=targets,
        loss_weights=weights,
        text_part=text_part,
        pred_frames=pred,
        target_frames=target,
        frame_mask=mask,
    )
    no_deriv = losses.LossConfig(freq_delta_weight=0.0, time_delta_weight=0.0)
    loss, m = losses.spectron_loss(config=no_deriv, **kw)
    np.testing.assert_allclose(loss, m["ce"] + m["spec"], rtol=1e-6)
    no_ce = losses.LossConfig(ce_weight=0.0)
    loss, m = losses.spectron_loss(config=no_ce, **kw)
    np.testing.assert_allclose(loss, m["spec"] + m["freq_delta"] + m["time_delta"], rtol=1e-6)


def test_stop_targets_and_bce():
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.int32)
    targets, gmask = losses.stop_targets(mask, 2)
    np.testing.assert_array_equal(targets, [[0, 0, 1], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(gmask, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    logits = np.array([[-1.0, 0.5, 2.0], [3.0, 9.0, 9.0], [9.0, 9.0, 9.0]], np.float32)
    got = losses.stop_loss(logits, targets, gmask)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    np.testing.assert_allclose(got, (bce * gmask).sum() / gmask.sum(), rtol=1e-5)


def test_label_smoothing_reference():
    logits, targets, weights, _ = make_text()
    nll, _, _ = losses.cross_entropy(logits, targets, weights, label_smoothing=0.1)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tl = np.take_along_axis(lp, targets[..., None], -1)[..., 0]
    ref = (0.9 * -tl - 0.1 * lp.mean(-1)) * weights
    np.testing.assert_allclose(nll, ref, rtol=1e-5, atol=1e-6)


def test_invalid_config():
    with pytest.raises(ValueError, match="time_delta_orders"):
        losses.LossConfig(time_delta_orders=-1)
    with pytest.raises(ValueError, match="time_delta_kind"):
        losses.LossConfig(time_delta_kind="second")


# -- the stop head ---------------------------------------------------------------------------


def _stop_batch():
    """r = 1; row 0 has 3 valid groups (last at 2), row 1 one (at 0); logits with known sigmoids:
    sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4."""
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.int32)
    ln3 = math.log(3.0)
    logits = np.array([[0.0, ln3, 0.0, 99.0], [ln3, -5.0, 7.0, 7.0]], np.float32)
    return mask, logits


def test_weighted_stop_bce_closed_form():
    mask, logits = _stop_batch()
    targets, gmask = losses.stop_targets(mask, 1)
    np.testing.assert_array_equal(targets, [[0, 0, 1, 0], [1, 0, 0, 0]])
    # Negatives: -log(1 - 1/2) = ln 2 and -log(1 - 3/4) = ln 4; positives, weighted by w:
    # -log(1/2) = ln 2 and -log(3/4) = ln(4/3); the mean runs over the 4 valid groups.
    for w in (1.0, 20.0):
        want = (math.log(2) + math.log(4) + w * (math.log(2) + math.log(4 / 3))) / 4
        got = losses.stop_loss(logits, targets, gmask, pos_weight=w)
        np.testing.assert_allclose(float(got), want, rtol=1e-6)

    # In the total: stop_weight * the weighted BCE on top of the other terms, which it leaves
    # unchanged; the default pos weight is the plain BCE (existing configs' loss is unchanged).
    assert losses.LossConfig().stop_pos_weight == 1.0
    logits_text, tokens, weights, text_part = make_text(b=2)
    frames = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    kw = dict(
        logits=logits_text,
        target_tokens=tokens,
        loss_weights=weights,
        text_part=text_part,
        pred_frames=frames,
        target_frames=frames * 0.5,
        frame_mask=mask,
    )
    cfg = losses.LossConfig(stop_weight=0.5, stop_pos_weight=20.0)
    base, _ = losses.spectron_loss(config=cfg, **kw)
    loss, metrics = losses.spectron_loss(config=cfg, stop_logits=logits, reduction_factor=1, **kw)
    want = (math.log(2) + math.log(4) + 20 * (math.log(2) + math.log(4 / 3))) / 4
    np.testing.assert_allclose(float(metrics["stop"]), want, rtol=1e-6)
    np.testing.assert_allclose(float(loss), float(base) + 0.5 * want, rtol=1e-6)
    assert {"stop_precision", "stop_recall", "stop_position_error"} <= set(metrics)
    with pytest.raises(ValueError, match="stop_pos_weight"):
        losses.LossConfig(stop_pos_weight=0.0)


def test_stop_metrics_on_known_logits():
    # r = 1, N = 6: row 0 has 5 valid groups (last at 4), row 1 three (last at 2), row 2 none.
    mask = np.zeros((3, 6), np.int32)
    mask[0, :5] = 1
    mask[1, :3] = 1
    targets, gmask = losses.stop_targets(mask, 1)
    logits = np.array(
        [
            [-1, 2, -1, -1, 3, 9],  # Fires at 1 (3 groups early) and at 4; 5 is padding.
            [-1, -1, -1, 5, 5, 5],  # Never fires on a valid group: counted as 2 + 1.
            [9, 9, 9, 9, 9, 9],  # No valid group: no row, no group.
        ],
        np.float32,
    )
    m = losses.stop_metrics(logits, targets, gmask)
    assert float(m["stop_precision"]) == pytest.approx(1 / 2)  # Fired: (0, 1), (0, 4).
    assert float(m["stop_recall"]) == pytest.approx(1 / 2)  # Last groups: (0, 4), (1, 2).
    assert float(m["stop_position_error"]) == pytest.approx((3 + 1) / 2)
    assert float(m["stop_position_bias"]) == pytest.approx((-3 + 1) / 2)
    # Spoken QA batches have no frame groups at all: zeros, not NaN or an error.
    empty = np.zeros((2, 0), np.float32)
    for value in losses.stop_metrics(empty, empty, empty).values():
        assert float(value) == 0.0
