import numpy as np
import pytest
import torch

from tvrn.data import DegenerateBoxError, adjacency, check_boxes, iou_matrix


def loop_iou(a, b):
    """IoU of two boxes, plain Python."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def loop_adjacency(boxes, threshold, mask):
    """(R, 4) boxes, (R,) mask -> R x R nested list of bools, plain Python double loop."""
    r = len(boxes)
    return [
        [bool(mask[j] and mask[k] and (j == k or loop_iou(boxes[j], boxes[k]) >= threshold)) for k in range(r)]
        for j in range(r)
    ]


def test_iou_matrix_matches_python_loop(precomp_random_boxes):
    boxes = precomp_random_boxes(np.random.default_rng(0), (3, 5)).astype(np.float64)
    iou = iou_matrix(boxes)  # (3, 5, 5)
    assert iou.shape == (3, 5, 5) and iou.dtype == torch.float64
    expected = [[[loop_iou(bx[j], bx[k]) for k in range(5)] for j in range(5)] for bx in boxes.tolist()]
    torch.testing.assert_close(iou, torch.tensor(expected, dtype=torch.float64))


def test_iou_exact_small_case():
    boxes = torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 3], [2, 0, 4, 2], [5, 5, 6, 6]])
    iou = iou_matrix(boxes)
    assert iou[0, 1].item() == pytest.approx(1 / 7)
    assert iou[0, 2].item() == 0.0  # touching edges
    assert iou[1, 2].item() == pytest.approx(1 / 7)
    assert torch.equal(iou.diagonal(), torch.ones(4))
    assert torch.equal(iou, iou.T)


def test_adjacency_matches_python_loop_with_mask(precomp_random_boxes):
    rng = np.random.default_rng(1)
    boxes = precomp_random_boxes(rng, (4, 6))
    mask = np.ones((4, 6), dtype=bool)
    mask[1, 4:] = False
    mask[3, 1:] = False
    boxes[1, 5] = [9, 9, 1, 1]  # degenerate but padded: ignored
    for threshold in (0.0, 0.1, 0.2, 0.5):
        adj = adjacency(boxes, threshold, mask)
        assert adj.dtype == torch.bool and adj.shape == (4, 6, 6)
        expected = [loop_adjacency(boxes[b].tolist(), threshold, mask[b]) for b in range(4)]
        assert adj.tolist() == expected


def test_adjacency_threshold_and_diagonal():
    boxes = torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 3], [10, 10, 12, 12]])
    assert adjacency(boxes, 0.1).tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    assert adjacency(boxes, 0.2).tolist() == [[True, False, False], [False, True, False], [False, False, True]]


def test_padded_regions_adjacent_to_nothing():
    boxes = torch.tensor([[[0.0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 0, 0]]])
    adj = adjacency(boxes, 0.2, mask=torch.tensor([[True, True, False]]))
    assert adj[0].tolist() == [[True, True, False], [True, True, False], [False, False, False]]


def test_zero_area_boxes_allowed():
    boxes = torch.tensor([[0.0, 0, 0, 5], [0, 0, 0, 5], [0, 0, 4, 4]])  # two identical zero-width boxes
    iou = iou_matrix(boxes)
    assert torch.isfinite(iou).all()
    assert iou[0, 1] == 0 and iou[0, 0] == 0 and iou[0, 2] == 0
    assert adjacency(boxes, 0.2).tolist() == [[True, False, False], [False, True, False], [False, False, True]]


def test_degenerate_box_names_image_and_region():
    boxes = torch.tensor([[[0.0, 0, 1, 1], [0, 0, 1, 1]], [[0, 0, 1, 1], [0, 5, 1, 4]]])  # y2 < y1
    with pytest.raises(DegenerateBoxError, match=r"image 1, region 1") as e:
        adjacency(boxes)
    assert (e.value.image_index, e.value.region_index) == (1, 1)
    with pytest.raises(DegenerateBoxError, match=r"in feats_bbx\.npy: image 42, region 1"):
        check_boxes(boxes, index=[41, 42], file="feats_bbx.npy")
    boxes[1, 1] = torch.tensor([2.0, 0, 1, 1])  # x2 < x1
    with pytest.raises(DegenerateBoxError, match="region 1"):
        check_boxes(boxes)
    boxes[1, 1] = torch.tensor([0.0, 0, float("nan"), 1])
    with pytest.raises(DegenerateBoxError, match="region 1"):
        check_boxes(boxes)


def test_numpy_int_and_unbatched_inputs():
    boxes = np.array([[0, 0, 2, 2], [1, 1, 3, 3]])
    assert iou_matrix(boxes).dtype == torch.float32
    assert adjacency(boxes, 0.1).tolist() == [[True, True], [True, True]]
