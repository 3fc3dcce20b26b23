"""Where is the prompt's voice lost? A speaker-identity probe at each stage of a checkpoint.

    python scripts/probe_speaker.py --checkpoint /tmp/stage3_spectron/checkpoints \
      [--task spectron_synthetic_counting --split validation --max-examples 200]

For every example of the split it takes one vector per stage of the model, and asks how much of
the example's own voice each one holds: a ridge regression, fitted on the even-indexed examples,
maps the vector to the voice of the example's reference continuation (mean and std over time of
its log-mel, standardised); on the odd-indexed examples, a prediction counts as right when the
nearest reference voice (cosine) is its own. Chance is 1 / (held-out examples). The stages:

- `prompt log-mel`: mean and std over time of the prompt's log-mel (what the encoder hears);
- `encoder prefix`: mean and std of the decoder prefix (connector(encoder(prompt))) over slots;
- `generated continuation`: mean and std of the free-running generated continuation's log-mel;
- `reference continuation`: the target itself (the ceiling, 1.0 up to the ridge penalty).

On eSpeak NG counting, the voice of an utterance is its voice name and its drawn pitch, pitch
range and rate (tasks/synthetic_counting.py): prompt and continuation share them, two utterances
of one voice name do not, so the voice is matched per utterance, not per voice name. The voice
can only be kept if the prefix (or the acoustic prompt) carries it; a prefix that does but a
generation that does not shows a decoder that does not use it.

Beside it, the detail of the generated log-mel against the reference's: mean |x[t, f+1] -
x[t, f]| (across frequency: harmonics, formant edges) and mean |x[t+1, f] - x[t, f]| (across
time), generated / reference. Below 1 is a smoothed spectrogram, the regression to the mean of
an L1/L2 head, which a speaker encoder hears as a less specific voice. Prints a Markdown table.
"""

from __future__ import annotations

import argparse

import numpy as np


def retrieval_accuracy(source: np.ndarray, target: np.ndarray, ridge: float = 1.0) -> float:
    """float[N, D_s] -> float[N, D_t]: the fraction of held-out examples (odd indices) whose ridge
    prediction, fitted on the even indices, is nearest (cosine) to their own target."""
    fit = np.arange(len(source)) % 2 == 0

    def standardise(x):
        mu, sd = x[fit].mean(0), x[fit].std(0) + 1e-6
        return (x - mu) / sd

    xs, ys = standardise(source), standardise(target)
    x = np.concatenate([xs, np.ones((len(xs), 1))], axis=1)
    a = x[fit]
    weights = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ ys[fit])
    pred, truth = x[~fit] @ weights, ys[~fit]
    pred /= np.linalg.norm(pred, axis=1, keepdims=True) + 1e-9
    truth /= np.linalg.norm(truth, axis=1, keepdims=True) + 1e-9
    return float(np.mean(np.argmax(pred @ truth.T, axis=1) == np.arange(len(pred))))


def detail(frames: np.ndarray) -> tuple[float, float]:
    """float[T, M] -> (mean |frequency delta|, mean |time delta|)."""
    return float(np.abs(np.diff(frames, axis=1)).mean()), float(
        np.abs(np.diff(frames, axis=0)).mean()
    )


def _stats(frames: np.ndarray) -> np.ndarray:
    return np.concatenate([frames.mean(0), frames.std(0)])


def probe(checkpoint: str, task: str, split: str, max_examples: int) -> dict[str, float]:
    import jax

    import spectron_tasks  # noqa: F401 - registers the tasks
    from spectron_jax import inference
    from spectron_jax.evaluation import runner
    from spectron_jax.network import Spectron

    loaded = inference.load_model_for_inference(checkpoint)
    config = loaded.model.config
    examples = runner.load_examples(task, split, max_examples)
    options = runner.EvalOptions(batch_size=16)
    _, generations = runner.decode_examples(loaded, examples, options)
    module = Spectron(config)
    vectors: dict[str, list[np.ndarray]] = {
        "prompt log-mel": [],
        "encoder prefix": [],
        "generated continuation": [],
        "reference continuation": [],
    }
    details: list[tuple[float, float, float, float]] = []
    encode = jax.jit(lambda p, f, m: module.apply({"params": p}, f, m, method=Spectron.encode))
    for ex, gen in zip(examples, generations, strict=True):
        prompt = ex["prompt_features"][: int(ex["prompt_length"])]
        prefix, mask = encode(loaded.params, prompt[None], np.ones((1, len(prompt)), np.int32))
        prefix, mask = np.asarray(prefix[0]), np.asarray(mask[0]) > 0
        vectors["encoder prefix"].append(_stats(prefix[mask]))
        if config.encoder_front_end == "log_mel":
            vectors["prompt log-mel"].append(_stats(prompt))
        reference = ex["continuation_frames"][: int(ex["continuation_length"])]
        vectors["reference continuation"].append(_stats(reference))
        frames = gen.frames if len(gen.frames) else np.zeros_like(reference[:1])
        vectors["generated continuation"].append(_stats(frames))
        if len(frames) > 1:
            details.append(detail(frames) + detail(reference))
    target = np.stack(vectors["reference continuation"])
    return {stage: retrieval_accuracy(np.stack(v), target) for stage, v in vectors.items() if v} | {
        "chance": 1.0 / (len(examples) // 2),
        "examples": float(len(examples)),
        "detail ratio, frequency": _ratio([d[0] for d in details], [d[2] for d in details]),
        "detail ratio, time": _ratio([d[1] for d in details], [d[3] for d in details]),
    }


def _ratio(generated: list[float], reference: list[float]) -> float:
    return float(np.mean(generated) / np.mean(reference)) if generated else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="repeatable")
    p.add_argument("--task", default="spectron_synthetic_counting")
    p.add_argument("--split", default="validation")
    p.add_argument("--max-examples", type=int, default=200)
    args = p.parse_args()
    results = {c: probe(c, args.task, args.split, args.max_examples) for c in args.checkpoint}
    stages = [k for k in next(iter(results.values())) if k not in ("chance", "examples")]
    stages = [k for k in stages if not k.startswith("detail")] + ["detail ratio, frequency"]
    stages += ["detail ratio, time"]
    print(f"voice probe on {args.task}:{args.split} (ridge to the reference voice, half fitted)")
    print("| checkpoint | " + " | ".join(stages) + " | chance |")
    print("|" + "---|" * (len(stages) + 2))
    for c, r in results.items():
        cells = [f"{r.get(s, float('nan')):.2f}" for s in stages]
        print(f"| {c} | " + " | ".join(cells) + f" | {r['chance']:.2f} |")


if __name__ == "__main__":
    main()
