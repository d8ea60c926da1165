"""``image-sites``: hospitals federate on their own images (MedMNIST-layout npz files
in their own folders, of different sizes and colour), evaluated leave-sites-out; a new
site with PNG folders adapts the result and predicts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from helpers import fedmeta, run_inline
from PIL import Image

from fedmeta.data.tasks.digits import _all_digits

CLASSES = (0, 1, 7)  # digits 0, 1, 7: three classes every site holds


def site_images(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Digit images upscaled to 24x24 RGB uint8 (each site its own brightness)."""
    x, y = _all_digits()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(
        np.concatenate(
            [rng.permutation(np.flatnonzero(y == c))[: n // len(CLASSES)] for c in CLASSES]
        )
    )
    scale = rng.uniform(0.7, 1.0)
    imgs = [
        np.asarray(
            Image.fromarray((x[i, 0] * 255 * scale).astype(np.uint8))
            .resize((24, 24))
            .convert("RGB")
        )
        for i in idx
    ]
    return np.stack(imgs), np.array([CLASSES.index(int(c)) for c in y[idx]])


def test_image_sites_train_evaluate_adapt_predict(tmp_path):
    data = tmp_path / "hospital-data"
    for s in range(4):  # 3 training sites, 1 held out
        images, labels = site_images(s, 90)
        (data / f"site-{s}").mkdir(parents=True)
        np.savez(
            data / f"site-{s}" / "data.npz", train_images=images, train_labels=labels.reshape(-1, 1)
        )
    out = tmp_path / "run"
    summary = run_inline(
        out,
        task="image-sites",
        classes=3,
        image_size=12,
        channels=1,
        sites=3,
        rounds=4,
        fraction_train=1.0,
        data_dir=str(data),
        eval_every=0,
        eval_episodes=10,
        eval_shots=5,
        inner_steps=10,
    )
    assert set(summary["epsilon"]) == {"site-0", "site-1", "site-2"}
    assert not summary["declined_rounds"]
    assert summary["eval"]["adapted"] > 0.6  # 3-way on the held-out site
    assert not list(out.rglob("*.npz"))

    new = tmp_path / "new-site"
    images, labels = site_images(7, 60)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        folder = new / ("labelled" if i < 30 else "unlabelled") / f"digit-{CLASSES[label]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    res = fedmeta(
        "adapt",
        str(out),
        "--data",
        str(new / "labelled"),
        "--out",
        str(tmp_path / "adapted.pt"),
        isolate=False,
    )
    assert res.returncode == 0, res.stderr[-1500:]
    res = fedmeta(
        "predict",
        str(tmp_path / "adapted.pt"),
        "--data",
        str(new / "unlabelled"),
        "--out",
        str(tmp_path / "pred.csv"),
        isolate=False,
    )
    assert res.returncode == 0, res.stderr[-1500:]
    rows = list(csv.DictReader((tmp_path / "pred.csv").open()))
    assert len(rows) == 30
    correct = [r["record_id"].split("/")[0] == r["prediction"] for r in rows]
    assert np.mean(correct) > 0.6, json.dumps(rows[:3])
    assert Path(tmp_path / "adapted.pt").stat().st_size > 0
