"""Model benchmark: Omniglot one-shot accuracy after a fixed training time on this machine.

Trains the ``omniglot`` preset on the 30 background alphabets only (each character
also rotated by 90, 180 and 270 degrees as new classes, the usual Omniglot
augmentation), then evaluates:

- ``oneshot20_lake_acc``: Lake's 20 official 20-way 1-shot runs (within-alphabet);
  anchor Koch et al. 2015 Siamese net 92.0 %.
- ``oneshot20_vinyals_acc``: random 20-way 1-shot episodes over the evaluation
  characters (Vinyals et al. 2016 protocol); anchor Prototypical Networks 96.0 %.
- ``map_at_r``: MAP@R (Musgrave et al. 2020) over evaluation characters.
- ``loop_vs_bare_step_ratio``: images/s of the full training loop (sampling,
  prefetch thread, sharded step) over a bare jitted step fed one batch from memory,
  both measured in this run, as the median of 3 alternating rounds (a busy machine's
  drifting load would otherwise bias one side).

    python -m bench.model --quick            # about 4.5 minutes, 2.5 of them training
    python -m bench.model --minutes 60       # the full run (training capped at 60 minutes)

Images go through the library's preprocessing (``image_to_array``), so the figures
hold for a model served by ``lookalike``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common import RESULTS, Timer, require_shared, write_result

log = logging.getLogger("bench.model")

QUICK_MINUTES = 2.5  # --quick's training budget (README.md and BUILD.md quote it)


def _to_inputs(ink_white: np.ndarray, spec: Any) -> np.ndarray:
    """[N, 105, 105] bool (True = white background) -> [N, S, S, 1] float32 model inputs."""
    from lookalike.model.preprocess import image_to_array

    return np.stack([image_to_array(Image.fromarray(img.astype(np.uint8) * 255, mode="L"), spec) for img in ink_white])


def load_background(spec: Any, rotations: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """-> images [N, S, S, 1], labels [N]: the background set (x4 rotated classes)."""
    raw = np.load(require_shared("omniglot/images_background.npz"))["images"]
    n_chars, n_draw = raw.shape[:2]
    base = _to_inputs(raw.reshape(-1, *raw.shape[2:]), spec)
    labels = np.repeat(np.arange(n_chars), n_draw)
    if not rotations:
        return base, labels.astype(np.int32)
    images = [np.rot90(base, k, axes=(1, 2)) for k in range(4)]
    return np.concatenate(images).astype(np.float32), np.concatenate([labels + k * n_chars for k in range(4)]).astype(np.int32)


def load_evaluation(spec: Any) -> tuple[np.ndarray, np.ndarray]:
    raw = np.load(require_shared("omniglot/images_evaluation.npz"))["images"]
    return _to_inputs(raw.reshape(-1, *raw.shape[2:]), spec), np.repeat(np.arange(raw.shape[0]), raw.shape[1]).astype(np.int32)


def load_lake_runs(spec: Any) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """-> per run: training images [20, ...], test images [20, ...], answer [20] (index of the
    matching training image for each test image)."""
    from lookalike.model.preprocess import decode_image

    runs = []
    with zipfile.ZipFile(require_shared("omniglot/one_shot_runs.zip")) as z:
        for r in range(1, 21):
            pairs = [line.split() for line in z.read(f"run{r:02d}/class_labels.txt").decode().splitlines() if line.strip()]
            train_names = sorted({t for _, t in pairs})
            train = np.stack([decode_image(z.read(n), spec) for n in train_names])
            test = np.stack([decode_image(z.read(q), spec) for q, _ in pairs])
            answer = np.asarray([train_names.index(t) for _, t in pairs])
            runs.append((train, test, answer))
    return runs


def lake_accuracy(embed: Any, runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
    correct = []
    for train, test, answer in runs:
        e_train, e_test = embed(train), embed(test)
        d = np.sum((e_test[:, None, :] - e_train[None, :, :]) ** 2, axis=-1)
        correct.extend(np.argmin(d, axis=1) == answer)
    return float(np.mean(correct))


def bare_step_images_per_s(config: Any, x: np.ndarray, y: np.ndarray, seconds: float) -> tuple[float, float]:
    """A jitted step fed one device-resident batch over and over -> (images/s, s/step)."""
    import jax

    from lookalike.model.encoder import create_encoder
    from lookalike.model.train import batch_maker, data_mesh, make_optimizer, replicate

    mesh = data_mesh()
    make_batch, step_fn, images_per_step = batch_maker(config, x, y, mesh)
    model = create_encoder(config)
    optimizer = make_optimizer(model, config)
    replicate(mesh, model, optimizer)
    batch = make_batch(0)
    for _ in range(3):
        jax.block_until_ready(step_fn(model, optimizer, *batch))
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        loss = step_fn(model, optimizer, *batch)
        steps += 1
        if steps % 5 == 0:
            jax.block_until_ready(loss)
    jax.block_until_ready(loss)
    step_s = (time.perf_counter() - started) / steps
    return images_per_step / step_s, step_s


def loop_vs_bare_rounds(config: Any, x: np.ndarray, y: np.ndarray, rounds: int, seconds: float) -> dict[str, Any]:
    """Training-loop images/s over bare-step images/s, measured in ``rounds`` alternating
    pairs of about ``seconds`` each (bare step, then ``train_on_arrays`` for as many steps),
    so a machine whose load drifts during the benchmark biases neither side: -> the median
    per-round ratio and the per-round figures."""
    from lookalike.model.config import apply_overrides
    from lookalike.model.data import LabelledImages
    from lookalike.model.train import train_on_arrays

    per_round = []
    for r in range(rounds):
        bare_ips, step_s = bare_step_images_per_s(config, x, y, seconds)
        steps = max(20, int(seconds / step_s))
        loop_config = apply_overrides(config, [f"num_steps={steps}", "val_fraction=0", f"eval_every_steps={steps}",
                                               f"checkpoint_every_steps={steps}", f"log_every_steps={max(1, steps // 4)}",
                                               f"warmup_steps={steps // 10 + 1}", f"seed={r}"])
        run_dir = Path(tempfile.mkdtemp(prefix="bench-model-loop-"))
        try:
            _, metrics, _ = train_on_arrays(loop_config, LabelledImages(x, y, [], [], []), run_dir)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        per_round.append({"bare_images_per_s": round(bare_ips, 1), "loop_images_per_s": metrics["images_per_s"],
                          "ratio": round(metrics["images_per_s"] / bare_ips, 3)})
        log.info("loop vs bare, round %d: %s", r + 1, per_round[-1])
    return {"ratio": float(np.median([p["ratio"] for p in per_round])), "rounds": per_round}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"a {QUICK_MINUTES}-minute training budget, smaller evaluation")
    parser.add_argument("--minutes", type=float, default=None,
                        help=f"training minutes (default 60, or {QUICK_MINUTES} with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps instead of a time budget")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the omniglot preset")
    args = parser.parse_args(argv)
    logging.basicConfig(force=True, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint file at INFO

    from lookalike.model.artifact import Encoder
    from lookalike.model.config import apply_overrides, config_to_dict, get_config
    from lookalike.model.data import LabelledImages
    from lookalike.model.evaluate import few_shot_accuracy
    from lookalike.model.metrics import retrieval_metrics
    from lookalike.model.preprocess import PreprocessSpec
    from lookalike.model.train import train_on_arrays

    minutes = args.minutes if args.minutes is not None else (QUICK_MINUTES if args.quick else 60.0)
    config = apply_overrides(get_config("omniglot"), args.set)
    spec = PreprocessSpec(image_size=config.image_size, channels=config.channels)
    with Timer() as t_data:
        x_bg, y_bg = load_background(spec)
        x_ev, y_ev = load_evaluation(spec)
        runs = load_lake_runs(spec)
    log.info("data: %d background images of %d classes, %d evaluation images, %.1f s",
             len(x_bg), len(np.unique(y_bg)), len(x_ev), t_data.s)

    throughput = loop_vs_bare_rounds(config, x_bg, y_bg, rounds=3, seconds=6.0 if args.quick else 15.0)
    bare_ips, step_s = bare_step_images_per_s(config, x_bg, y_bg, seconds=8.0 if args.quick else 20.0)
    num_steps = args.steps or max(20, int(minutes * 60 / step_s * 0.93))
    config = apply_overrides(config, [
        f"num_steps={num_steps}", "val_fraction=0", f"eval_every_steps={num_steps}",
        *([] if args.steps else [f"max_train_minutes={minutes}"]),  # a hard cap: a busy machine gets fewer steps
        f"checkpoint_every_steps={max(num_steps // 4, 1)}", f"warmup_steps={min(config.warmup_steps, num_steps // 10 + 1)}",
        f"log_every_steps={max(1, min(config.log_every_steps, num_steps // 20))}",
    ])
    log.info("bare step %.3f s (%.0f images/s): training %d steps for about %.1f minutes", step_s, bare_ips, num_steps, minutes)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-model-"))
    try:
        with Timer() as t_train:
            model, metrics, _ = train_on_arrays(config, LabelledImages(x_bg, y_bg, [], [], []), run_dir)
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "training.png", RESULTS / f"model_training{'' if args.quick else '-full'}.png")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    encoder = Encoder(model, {"version": "bench", "embed_dim": config.embed_dim, "preprocess": spec.to_dict()})
    with Timer() as t_eval:
        lake = lake_accuracy(encoder.embed, runs)
        emb_ev = encoder.embed(x_ev)
        vinyals = few_shot_accuracy(emb_ev, y_ev, n_way=20, k_shot=1, episodes=1000 if args.quick else 4000, seed=0)
        n_classes = 200 if args.quick else len(np.unique(y_ev))
        chosen = np.random.default_rng(0).choice(np.unique(y_ev), size=n_classes, replace=False)
        keep = np.isin(y_ev, chosen)
        retrieval = retrieval_metrics(emb_ev[keep], y_ev[keep], ks=(1, 5))
    result = {
        "mode": "quick" if args.quick else "full",
        "oneshot20_lake_acc": lake,
        "oneshot20_vinyals_acc": vinyals,
        "map_at_r": retrieval["map_at_r"],
        "map_at_r_classes": int(n_classes),
        "precision_at_1": retrieval["precision_at_1"],
        "r_precision": retrieval["r_precision"],
        "train_minutes": round(t_train.s / 60, 2),
        "train_steps": metrics["steps"],
        "planned_steps": num_steps,
        "loop_vs_bare_step_ratio": round(throughput["ratio"], 3),
        "loop_vs_bare_rounds": throughput["rounds"],
        "training_loop_images_per_s": metrics["images_per_s"],
        "bare_step_images_per_s_before_training": round(bare_ips, 1),
        "final_loss": metrics["final_loss"],
        "eval_seconds": round(t_eval.s, 1),
        "anchors": {"koch2015_lake_acc": 0.92, "protonets_vinyals_20way1shot_acc": 0.96},
        "config": config_to_dict(config),
    }
    write_result("model" if args.quick else "model-full", result)
    log.info("lake %.3f  vinyals %.3f  map@r %.3f  loop/bare %.2f  train %.1f min", lake, vinyals,
             retrieval["map_at_r"], result["loop_vs_bare_step_ratio"], result["train_minutes"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
