import torch

from fcmae.metrics import ClassificationMeter


def test_topk_and_per_class_against_direct_computation():
    torch.manual_seed(0)
    logits, target = torch.randn(200, 10), torch.randint(0, 10, (200,))
    meter = ClassificationMeter(10)
    for lg, tg in zip(logits.split(64), target.split(64)):
        meter.update(lg, tg)
    top5 = logits.topk(5, 1).indices
    expect1 = (logits.argmax(1) == target).float().mean().item() * 100
    expect5 = (top5 == target[:, None]).any(1).float().mean().item() * 100
    s = meter.summary()
    assert abs(s["top1"] - expect1) < 1e-4 and abs(s["top5"] - expect5) < 1e-4 and s["count"] == 200
    for c, n, acc in meter.per_class():
        sel = target == c
        assert n == sel.sum().item()
        assert abs(acc - (logits[sel].argmax(1) == c).float().mean().item() * 100) < 1e-4


def test_fewer_than_five_classes():
    meter = ClassificationMeter(3)
    meter.update(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]]), torch.tensor([1, 2]))
    assert meter.summary() == {"top1": 50.0, "top5": 100.0, "count": 2}
