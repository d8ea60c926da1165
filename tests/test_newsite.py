"""The new site's payoff: a hospital that never trained receives the federation's model,
adapts it to a few labelled images of classes the federation never saw, and predicts.

A real digits-fewshot federation (inline backend, DP on) trains once; the new site's
data are PNG files of held-out digit classes in tmp_path. The adapted model must beat
the un-adapted model by far and be no worse than the same procedure from scratch on the
site's unlabelled images; its provenance must tie it to the run's signed audit log."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fedmeta, run_inline
from PIL import Image

import fedmeta as api
from fedmeta.config import RunConfig, build_task
from fedmeta.data.loaders import load_imagefolder
from fedmeta.data.tasks.digits import _all_digits, class_split
from fedmeta.newsite.adapting import adapt_model
from fedmeta.newsite.provenance import ProvenanceError
from fedmeta.paths import RunPaths

pytestmark = pytest.mark.slow
SHOTS, QUERY, WAYS = 5, 40, 5


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("federation") / "run"
    run_inline(run, task="digits-fewshot", sites=4, rounds=10, fraction_train=1.0,
               eval_every=0, eval_episodes=5)
    return run


@pytest.fixture(scope="module")
def new_site(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """PNG images of 5 test classes (never trained on): 5 labelled per class, 40 unlabelled."""
    root = tmp_path_factory.mktemp("new-site")
    x, y = _all_digits()
    rng = np.random.default_rng(0)
    labelled, unlabelled, truth = root / "labelled", root / "unlabelled", {}
    for c in class_split()["test"][:WAYS]:
        idx = rng.permutation(np.flatnonzero(y == c))
        for folder, chosen in ((labelled, idx[:SHOTS]), (unlabelled, idx[SHOTS:SHOTS + QUERY])):
            for i in chosen:
                name = f"class-{c}/{i}.png" if folder is labelled else f"scan-{i}.png"
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((x[i, 0] * 255).round().astype(np.uint8), "L").save(folder / name)
                if folder is unlabelled:
                    truth[name] = f"class-{c}"
    return labelled, unlabelled, truth


def accuracy_of(pred_csv: Path, truth: dict[str, str]) -> float:
    rows = list(csv.DictReader(pred_csv.open()))
    assert {r["record_id"] for r in rows} == set(truth)
    return float(np.mean([truth[r["record_id"]] == r["prediction"] for r in rows]))


def test_adapted_beats_unadapted_and_is_no_worse_than_scratch(federation, new_site, tmp_path):
    labelled, unlabelled, truth = new_site
    # the commands a new hospital runs
    res = fedmeta("adapt", str(federation), "--data", str(labelled), "--shots", str(SHOTS),
                  "--out", str(tmp_path / "adapted.pt"), isolate=False)
    assert res.returncode == 0, res.stderr
    assert "adapted to 5 classes on 25 labelled examples" in res.stdout
    res = fedmeta("predict", str(tmp_path / "adapted.pt"), "--data", str(unlabelled),
                  "--out", str(tmp_path / "predictions.csv"), isolate=False)
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert set(rows[0]) == {"record_id", "prediction", *[f"p_class-{c}" for c in
                                                          class_split()["test"][:WAYS]]}
    assert all(abs(sum(float(v) for k, v in r.items() if k.startswith("p_")) - 1) < 1e-4
               for r in rows)
    adapted = accuracy_of(tmp_path / "predictions.csv", truth)

    # scratch: the same procedure (prototype head + fine-tuning) from a random model
    adapt_model(federation, labelled, shots=SHOTS, out=tmp_path / "scratch.pt", init="scratch")
    api.predict(tmp_path / "scratch.pt", unlabelled, out=tmp_path / "scratch.csv")
    scratch = accuracy_of(tmp_path / "scratch.csv", truth)

    # un-adapted: the federation's model as received, its first 5 outputs as the 5 classes
    saved = torch.load(RunPaths(federation).model, weights_only=True)
    net = build_task(RunConfig.load(RunPaths(federation).config)).build_model(saved["out_dim"])
    net.load_state_dict(saved["state_dict"])
    query = load_imagefolder(unlabelled, (1, 8, 8), labelled=False).records
    with torch.no_grad():
        guess = net(torch.from_numpy(query.x))[:, :WAYS].argmax(1).numpy()
    names = [f"class-{c}" for c in class_split()["test"][:WAYS]]
    unadapted = float(np.mean([truth[r] == names[g] for r, g in zip(query.record_ids, guess,
                                                                      strict=True)]))
    print(json.dumps({"unadapted": unadapted, "adapted": adapted, "scratch": scratch}))
    assert adapted > unadapted + 0.5 and adapted >= 0.75
    # Measured, not wished for: on 8x8 digits a random CNN's embedding with class
    # prototypes is a strong baseline, and this short DP federation (4 sites, 10 rounds)
    # does not beat it (adapted 0.87, scratch 0.895 with these seeds; docs/new-site.md).
    # What must hold: the federation's model is not worse than a site starting alone.
    assert adapted >= scratch - 0.05


def test_adapted_model_carries_its_provenance(federation, new_site, tmp_path):
    labelled, unlabelled, _ = new_site
    result = api.adapt(federation, labelled, shots=3, out=tmp_path / "a.pt")
    saved = torch.load(tmp_path / "a.pt", weights_only=True)
    summary = json.loads(RunPaths(federation).summary.read_text())
    prov = saved["provenance"]
    assert prov["run_id"] == summary["run"] and prov["final_model_sha256"] == summary[
        "model_sha256"]
    entry = [json.loads(x) for x in (RunPaths(federation).server_log)
             .read_text().splitlines()][prov["audit_entry"]["seq"]]
    assert entry["action"] == "run.end" and entry["model_out"] == prov["final_model_sha256"]
    assert entry["sig"] == prov["audit_entry"]["sig"]
    assert saved["task"] == "digits-fewshot" and saved["classes"] == list(result.classes)
    assert saved["preprocessing"]["shape"] == [1, 8, 8] and saved["adaptation"]["shots"] == 3
    assert prov["audit_key_source"] == "embedded"  # no key pinned: trust on first use, said
    # pinned: the coordinator's public key given out of band
    from fedmeta.audit.keys import public_key_path

    pub = public_key_path(RunPaths(federation).server_key)
    pinned = api.adapt(federation, labelled, shots=3, public_key=pub)
    assert pinned.provenance["audit_key_source"] == "given"
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedmeta.audit.keys import public_pem

    other = tmp_path / "other.pub.pem"
    other.write_bytes(public_pem(Ed25519PrivateKey.generate()))
    with pytest.raises(ProvenanceError, match="fails verification"):
        api.adapt(federation, labelled, shots=3, public_key=other)
    # 3 of the 5 labelled images per class adapt; the other 2 are held back and scored
    assert result.support == 15 and result.held_back == 10
    assert saved["adaptation"]["held_back_accuracy"] == result.held_back_accuracy


def test_tampered_model_or_log_is_refused(federation, new_site, tmp_path):
    import shutil

    labelled, _, _ = new_site
    copy = tmp_path / "run"
    shutil.copytree(federation, copy)
    saved = torch.load(RunPaths(copy).model, weights_only=True)
    saved["state_dict"]["head.bias"] += 0.01
    torch.save(saved, RunPaths(copy).model)
    with pytest.raises(ProvenanceError, match="not the federation's final model"):
        api.adapt(copy, labelled)
    shutil.copy(RunPaths(federation).model, RunPaths(copy).model)
    log = RunPaths(copy).server_log
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # an entry deleted
    res = fedmeta("adapt", str(copy), "--data", str(labelled), "--out", str(tmp_path / "x.pt"),
                  isolate=False)
    assert res.returncode == 2 and "audit log fails verification" in res.stderr
    assert "Traceback" not in res.stderr
