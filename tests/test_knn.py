"""Weighted k-NN against a direct per-query implementation written from the definition."""
import pytest
import torch
import torch.nn.functional as F

from dino_fast.eval.knn import knn_classifier


def _knn_loop(train, train_labels, test, k, T, num_classes):
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    preds = []
    for q in test:
        sims = train @ q
        order = sorted(range(len(train)), key=lambda i: -sims[i].item())[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_labels[i])] += torch.exp(sims[i] / T).item()
        preds.append(sorted(range(num_classes), key=lambda c: -votes[c]))
    return preds


@pytest.mark.parametrize("seed,k,classes", [(0, 20, 10), (1, 5, 3), (2, 1, 7)])
def test_knn_matches_loop(seed, k, classes):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(120, 16, generator=g)
    test = torch.randn(33, 16, generator=g)
    train_labels = torch.randint(0, classes, (120,), generator=g)
    test_labels = torch.randint(0, classes, (33,), generator=g)
    preds = _knn_loop(train, train_labels, test, k, 0.07, classes)
    top1 = 100 * sum(p[0] == int(t) for p, t in zip(preds, test_labels)) / 33
    top5 = 100 * sum(int(t) in p[:min(5, k, classes)] for p, t in zip(preds, test_labels)) / 33
    got1, got5 = knn_classifier(train, train_labels, test, test_labels, k=k, T=0.07, num_classes=classes, chunk=8)
    assert got1 == pytest.approx(top1) and got5 == pytest.approx(top5)


def test_knn_separable_is_perfect():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 32, generator=g) * 10
    labels = torch.arange(4).repeat_interleave(25)
    feats = centers[labels] + torch.randn(100, 32, generator=g)
    top1, top5 = knn_classifier(feats, labels, feats + 0.01, labels, k=10)
    assert top1 == 100.0 and top5 == 100.0


def test_knn_shape_errors():
    with pytest.raises(ValueError, match="same D"):
        knn_classifier(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(2, 5),
                       torch.zeros(2, dtype=torch.long))
