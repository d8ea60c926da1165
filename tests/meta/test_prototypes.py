"""The prototype head classifies by nearest class mean in embedding space."""

from __future__ import annotations

import pytest
import torch

from fedmeta.data.records import Records
from fedmeta.meta.models import MLP, SmallCNN
from fedmeta.meta.prototypes import class_prototypes, embedding, prototype_head


@pytest.mark.parametrize("n_classes", [2, 3, 7])
def test_prototype_head_is_nearest_class_mean(n_classes: int) -> None:
    torch.manual_seed(0)
    model = SmallCNN(5)
    x = torch.randn(4 * n_classes, 1, 8, 8)
    y = torch.arange(n_classes).repeat(4)
    prototype_head(model, x, y, n_classes)
    assert model.head.out_features == n_classes
    probe = torch.randn(50, 1, 8, 8)
    z = embedding(model, probe)
    protos = torch.stack([embedding(model, x)[y == c].mean(0) for c in range(n_classes)])
    nearest = (torch.cdist(z, protos) ** 2).argmin(1)
    assert torch.equal(model(probe).argmax(1), nearest)


def test_missing_class_is_refused() -> None:
    with pytest.raises(ValueError, match=r"class\(es\) \[2\]"):
        class_prototypes(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), 3)


def test_model_without_features_is_refused() -> None:
    with pytest.raises(TypeError, match="features.*head|head.*features"):
        prototype_head(torch.nn.Linear(3, 2), torch.randn(2, 3), torch.tensor([0, 1]), 2)


def test_mlp_head_keeps_device_and_dtype() -> None:
    model = MLP(4, (8,), 2).double()
    prototype_head(model, torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2] * 2), 3)
    assert model.head.weight.dtype == torch.float64


def test_records_units_follow_subsets() -> None:
    import numpy as np

    recs = Records(
        x=np.zeros((4, 1)),
        y=np.zeros(4),
        groups=np.zeros(4),
        record_ids=np.arange(4),
        units=np.array([7, 7, 8, 9]),
    )
    assert list(recs.subset(np.array([1, 3])).units) == [7, 9]
    with pytest.raises(ValueError, match="units"):
        Records(
            x=np.zeros((2, 1)),
            y=np.zeros(2),
            groups=np.zeros(2),
            record_ids=np.arange(2),
            units=np.arange(3),
        )


def test_spread_temperature_keeps_predictions_and_tames_the_logits() -> None:
    torch.manual_seed(1)
    x, y = torch.randn(10, 1, 8, 8) * 5, torch.arange(5).repeat(2)
    raw, tempered = SmallCNN(5), SmallCNN(5)
    tempered.load_state_dict(raw.state_dict())
    prototype_head(raw, x, y, 5)
    prototype_head(tempered, x, y, 5, temperature="spread")
    probe = torch.randn(40, 1, 8, 8)
    assert torch.equal(raw(probe).argmax(1), tempered(probe).argmax(1))
    protos = class_prototypes(embedding(raw, x), y, 5)
    spread = float(((protos - protos.mean(0)) ** 2).sum(1).mean())
    torch.testing.assert_close(tempered(probe), raw(probe) / spread)
    with pytest.raises(ValueError, match="temperature"):
        prototype_head(SmallCNN(5), x, y, 5, temperature=0.0)
