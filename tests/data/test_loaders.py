"""Bundled loaders on real files built in tmp_path: image folders (PNG/JPEG, grayscale and
RGB, resized), MedMNIST-layout npz, DICOM (if pydicom is installed), CSV with per-site
standardisation; policy columns and units from the sidecar; one-line errors naming the
file and line or entry, also for malformed inputs drawn by hypothesis."""

from __future__ import annotations

import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fedmeta.data.loaders import (
    DataError,
    find_site_data,
    load_data,
    load_imagefolder,
    load_npz,
    load_tabular,
    read_features,
)
from fedmeta.data.record_meta import load_record_meta

EXAMPLES = Path(__import__("fedmeta.data", fromlist=["x"]).__path__[0]) / "examples"


def image_folder(
    root: Path, mode: str = "L", size: int = 16, n: int = 3, suffix: str = ".png"
) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("benign", "malignant")):
        (root / name).mkdir(parents=True)
        for i in range(n):
            shape = (size, size) if mode == "L" else (size, size, 3)
            arr = (rng.random(shape) * 100 + 100 * c).astype(np.uint8)
            Image.fromarray(arr, mode).save(root / name / f"img-{i}{suffix}")
    return root


def test_image_folder_grayscale_resized_to_the_model_input(tmp_path):
    root = image_folder(tmp_path / "imgs")
    (root / "notes.txt").write_text("not an image, skipped")
    loaded = load_imagefolder(root, (1, 8, 8))
    r = loaded.records
    assert r.x.shape == (6, 1, 8, 8) and r.x.dtype == np.float32
    assert r.x.min() >= 0.0 and r.x.max() <= 1.0
    assert loaded.classes == ("benign", "malignant") and r.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert r.record_ids[0] == "benign/img-0.png" and r.units is None
    # class 1 is brighter by construction: the resize keeps it so
    assert r.x[r.y == 1].mean() > r.x[r.y == 0].mean() + 0.2


def test_image_folder_rgb_jpeg_to_rgb_and_to_grayscale(tmp_path):
    root = image_folder(tmp_path / "imgs", mode="RGB", suffix=".jpg")
    assert load_imagefolder(root, (3, 10, 12)).records.x.shape == (6, 3, 10, 12)
    assert load_imagefolder(root, (1, 8, 8)).records.x.shape == (6, 1, 8, 8)


def test_sidecar_gives_policy_columns_and_units(tmp_path):
    root = image_folder(tmp_path / "imgs")
    (root / "records.csv").write_text(
        "record_id,unit,consent_purposes,age,erasure_requested\n"
        "benign/img-0.png,patient-1,research.model-training,54,\n"
        "benign/img-1.png,patient-1,research.model-training,54,true\n"
        "malignant/img-2.png,,,12,\n"
    )
    r = load_imagefolder(root, (1, 8, 8)).records
    assert r.units is not None and r.units[0] == r.units[1] == "patient-1"
    assert len(set(r.units)) == 5  # rows without a unit are their own unit
    meta = load_record_meta(tmp_path, r)
    by_id = {m.record_id: m for m in meta}
    assert by_id["benign/img-1.png"].erasure_requested is True
    assert by_id["malignant/img-2.png"].age == 12
    assert "research.model-training" in by_id["benign/img-0.png"].consented_purposes


@pytest.mark.parametrize(
    "text, where",
    [
        ("record_id,unit\nbenign/nope.png,p1\n", "records.csv line 2, column 'record_id'"),
        ("record_id,age\nbenign/img-0.png,200\n", "records.csv line 2, column 'age'"),
        ("record_id,colour\n", "records.csv line 1"),
        ("record_id,unit\nbenign/img-0.png,p\nbenign/img-0.png,p\n", "records.csv line 3"),
    ],
)
def test_sidecar_errors_name_file_and_line(tmp_path, text, where):
    root = image_folder(tmp_path / "imgs")
    (root / "records.csv").write_text(text)
    with pytest.raises(DataError) as err:
        load_imagefolder(root, (1, 8, 8))
    assert where in str(err.value) and "\n" not in str(err.value)


def test_a_corrupt_image_is_named(tmp_path):
    root = image_folder(tmp_path / "imgs")
    (root / "malignant" / "img-1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"^malignant/img-1.png: not a readable PNG/JPEG"):
        load_imagefolder(root, (1, 8, 8))


def test_image_folder_shape_errors(tmp_path):
    root = image_folder(tmp_path / "imgs")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "loose.png")
    with pytest.raises(DataError, match="loose.png: an image directly in the folder"):
        load_imagefolder(root, (1, 8, 8))
    # unlabelled (predict): loose images and sub-folders are all records
    assert len(load_imagefolder(root, (1, 8, 8), labelled=False).records) == 7
    with pytest.raises(DataError, match="not an image shape"):
        load_imagefolder(root, (30,))


def medmnist(path: Path, n: int = 12, rgb: bool = False) -> Path:
    rng = np.random.default_rng(1)
    shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
    np.savez(
        path,
        train_images=rng.integers(0, 255, shape, dtype=np.uint8),
        train_labels=(np.arange(n) % 3).reshape(n, 1).astype(np.int64) * 2,
        test_images=rng.integers(0, 255, shape, dtype=np.uint8),
        test_labels=np.zeros((n, 1), np.int64),
    )
    return path


def test_npz_medmnist_layout(tmp_path):
    path = medmnist(tmp_path / "pneumonia.npz", rgb=True)
    loaded = load_npz(path, (1, 8, 8))
    r = loaded.records
    assert r.x.shape == (12, 1, 8, 8) and loaded.classes == ("0", "2", "4")
    assert r.y.tolist()[:4] == [0, 1, 2, 0] and r.record_ids[3] == "train-3"
    assert load_npz(path, (1, 8, 8), split="test", labelled=False).records.x.shape[0] == 12
    (tmp_path / "pneumonia.records.csv").write_text("record_id,unit\ntrain-0,p1\ntrain-5,p1\n")
    assert load_npz(path, (1, 8, 8)).records.units[5] == "p1"


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros(3)}, "no array 'train_images'"),
        ({"train_images": np.zeros((2, 4, 4), np.uint8)}, "no array 'train_labels'"),
        (
            {"train_images": np.zeros((2, 4, 4), np.uint8), "train_labels": np.zeros((3, 1))},
            "train_labels has shape (3, 1)",
        ),
        (
            {
                "train_images": np.zeros((2, 4, 4), np.uint8),
                "train_labels": np.array([[0.5], [1.0]]),
            },
            "not integer class ids",
        ),
        (
            {"train_images": np.zeros((2, 4, 4), np.uint8), "train_labels": np.array([0, -1])},
            "entry train_labels[1]: negative",
        ),
        (
            {"train_images": np.full((2, 4, 4), 2.0), "train_labels": np.array([0, 1])},
            "entry train_images[0]: float pixel values",
        ),
    ],
)
def test_npz_errors_name_file_and_entry(tmp_path, arrays, message):
    path = tmp_path / "site.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as err:
        load_npz(path, (1, 8, 8))
    assert str(err.value).startswith("site.npz") and message in str(err.value)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(blob=st.binary(max_size=300))
def test_arbitrary_bytes_as_npz_or_image_fail_in_one_line(tmp_path, blob):
    npz = tmp_path / "x.npz"
    npz.write_bytes(blob)
    with pytest.raises(DataError) as err:
        load_npz(npz, (1, 8, 8))
    assert "\n" not in str(err.value) and "x.npz" in str(err.value)
    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "b.png").write_bytes(blob)
    (tmp_path / "imgs" / "c").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "imgs" / "c" / "ok.png")
    with pytest.raises(DataError) as err:
        load_imagefolder(tmp_path / "imgs", (1, 8, 8))
    assert "\n" not in str(err.value) and "a/b.png" in str(err.value)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    names=st.lists(
        st.sampled_from(["train_images", "train_labels", "train_units", "junk"]),
        min_size=1,
        max_size=3,
        unique=True,
    ),
    n=st.integers(0, 3),
    width=st.integers(0, 3),
    dtype=st.sampled_from(["uint8", "int64", "float64", "bool", "U3"]),
)
def test_malformed_npz_arrays_fail_in_one_line(tmp_path, names, n, width, dtype):
    arrays = {
        name: np.zeros((n, width, width), dtype=dtype)
        if "images" in name
        else np.zeros((n,), dtype=dtype)
        for name in names
    }
    path = tmp_path / "m.npz"
    np.savez(path, **arrays)
    try:
        load_npz(path, (1, 8, 8))
    except DataError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("m.npz")


def test_a_truncated_npz_is_named(tmp_path):
    path = medmnist(tmp_path / "site.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"^site.npz: "):
        load_npz(path, (1, 8, 8))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("train_images.npy", b"not an npy")
    path.write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"^site.npz: "):
        load_npz(path, (1, 8, 8))


def test_dicom_folder(tmp_path):
    if importlib.util.find_spec("pydicom") is None:
        pytest.skip("pydicom is not installed (optional extra fedmeta[dicom])")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def write(path: Path, value: int) -> None:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.PatientName = "Never^Read"
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        arr = np.zeros((16, 16), np.uint16)
        arr[:, :value] = 4000
        ds.PixelData = arr.tobytes()
        ds.save_as(path, enforce_file_format=True)

    for c, value in (("a", 4), ("b", 12)):
        (tmp_path / c).mkdir()
        for i in range(2):
            write(tmp_path / c / f"{i}.dcm", value)
    r = load_imagefolder(tmp_path, (1, 8, 8)).records
    assert r.x.shape == (4, 1, 8, 8) and r.x[r.y == 1].mean() > r.x[r.y == 0].mean()
    (tmp_path / "b" / "bad.dcm").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"^b/bad.dcm: not a readable DICOM"):
        load_imagefolder(tmp_path, (1, 8, 8))


SCHEMA = """
[dataset]
name = "cohort"
task = "classification"
label = "diagnosis"
features = ["bmi", "glucose"]
classes = ["benign", "malignant"]
standardise = true

[columns]
record_id = "pid"
"""


def test_csv_standardised_per_site_and_read_without_labels(tmp_path):
    rng = np.random.default_rng(2)
    rows = [
        f"P{i},{20 + 5 * rng.random():.2f},{4 + rng.random():.3f},{('benign', 'malignant')[i % 2]}"
        for i in range(30)
    ]
    (tmp_path / "schema.toml").write_text(SCHEMA)
    (tmp_path / "data.csv").write_text("pid,bmi,glucose,diagnosis\n" + "\n".join(rows) + "\n")
    loaded = load_tabular(tmp_path)
    x = loaded.records.x
    assert np.allclose(x.mean(0), 0, atol=1e-5) and np.allclose(x.std(0), 1, atol=1e-4)
    assert loaded.classes == ("benign", "malignant") and loaded.read_columns == ("bmi", "glucose")
    prep = loaded.preprocessing
    # the same records without the label column (and columns reordered): same scaling
    unlabelled = ["glucose,pid,bmi"] + [
        f"{r.split(',')[2]},{r.split(',')[0]},{r.split(',')[1]}" for r in rows
    ]
    (tmp_path / "new.csv").write_text("\n".join(unlabelled) + "\n")
    unl = read_features(tmp_path / "new.csv", prep)
    assert np.allclose(unl.x, x, atol=1e-5) and unl.record_ids[0] == "P0"
    (tmp_path / "bad.csv").write_text("pid,bmi,glucose\nP1,21.0,4.1\nP2,n/a,4.2\n")
    with pytest.raises(DataError, match=r"^bad.csv line 3, column 'bmi': 'n/a' is not a number"):
        read_features(tmp_path / "bad.csv", prep)
    (tmp_path / "short.csv").write_text("pid,bmi\nP1,21.0\n")
    with pytest.raises(DataError, match=r"^short.csv line 1: header lacks feature column"):
        read_features(tmp_path / "short.csv", prep)


def test_find_site_data_by_conventional_names(tmp_path):
    assert find_site_data(tmp_path, lambda: (1, 8, 8)) is None  # a bundled-task site
    image_folder(tmp_path / "images")
    assert len(find_site_data(tmp_path, lambda: (1, 8, 8)).records) == 6
    (tmp_path / "other").mkdir()
    medmnist(tmp_path / "other" / "data.npz")
    assert len(load_data(tmp_path / "other", (1, 8, 8)).records) == 12
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no data found"):
        load_data(tmp_path / "empty", (1, 8, 8))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(alphabet=st.sampled_from(list('record_idunitage,;\n"x0159-T: ')), max_size=120))
def test_malformed_sidecar_loads_or_fails_in_one_line(tmp_path, text):
    root = tmp_path / "imgs"
    if not root.exists():
        image_folder(root)
    (root / "records.csv").write_text(text)
    try:
        load_imagefolder(root, (1, 8, 8))
    except DataError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("records.csv")
