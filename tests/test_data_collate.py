import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tvrn.data import (
    DegenerateBoxError,
    ImageBatch,
    PairBatch,
    PairDataset,
    PrecompSplit,
    Vocabulary,
    adjacency,
    collate_images,
    collate_texts,
    iter_image_batches,
    iter_text_batches,
)


class CharTokenizer:
    """Duck-typed tokenizer: one id per word = its length, pad id 99."""

    pad_id = 99

    def encode(self, caption: str) -> list[int]:
        return [len(w) for w in caption.split()]


def test_collate_texts_exact():
    batch = collate_texts([[1, 5, 2], [1, 2], [1, 7, 8, 9, 2]], pad_id=0, caption_to_image=[0, 0, 3], index=[4, 1, 17])
    assert batch.tokens.tolist() == [[1, 5, 2, 0, 0], [1, 2, 0, 0, 0], [1, 7, 8, 9, 2]]
    assert batch.tokens.dtype == torch.long
    assert batch.mask.tolist() == [
        [True, True, True, False, False], [True, True, False, False, False], [True, True, True, True, True]
    ]
    assert batch.lengths.tolist() == [3, 2, 5]
    assert batch.caption_to_image.tolist() == [0, 0, 3] and batch.index.tolist() == [4, 1, 17]
    other = collate_texts([[4, 4]], pad_id=7)
    assert other.tokens.tolist() == [[4, 4]] and other.caption_to_image is None and other.index is None
    with pytest.raises(ValueError):
        collate_texts([[1], []], pad_id=0)


def test_collate_images_mask_adjacency_and_slicing(precomp_random_boxes):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((3, 4, 2)).astype(np.float32)
    boxes = precomp_random_boxes(rng, (3, 4))
    batch = collate_images(feats, boxes, index=[10, 11, 12], adjacency_threshold=0.1)
    assert batch.mask.all() and batch.mask.shape == (3, 4)
    assert torch.equal(batch.features, torch.from_numpy(feats))
    assert torch.equal(batch.adjacency, adjacency(boxes, 0.1))
    assert batch.index.tolist() == [10, 11, 12]
    for i0, i1 in ((0, 1), (1, 3)):
        part = batch[i0:i1]
        assert torch.equal(part.adjacency, adjacency(boxes[i0:i1], 0.1))
        assert torch.equal(part.boxes, torch.from_numpy(boxes[i0:i1]))
        assert part.index.tolist() == [10 + i for i in range(i0, i1)]


def test_collate_images_variable_regions(precomp_random_boxes):
    rng = np.random.default_rng(1)
    feats = np.ones((2, 3, 2), dtype=np.float32)
    boxes = precomp_random_boxes(rng, (2, 3))
    boxes[1, 2] = [5, 5, 1, 1]  # degenerate, but a padded region
    batch = collate_images(feats, boxes, index=[0, 1], num_regions=[3, 2])
    assert batch.mask.tolist() == [[True, True, True], [True, True, False]]
    assert batch.features[1, 2].tolist() == [0.0, 0.0] and batch.features[1, 1].tolist() == [1.0, 1.0]
    assert not batch.adjacency[1, 2].any() and not batch.adjacency[1, :, 2].any()
    assert torch.equal(batch.adjacency, adjacency(boxes, 0.2, batch.mask))
    no_boxes = collate_images(feats, None, None)
    assert no_boxes.boxes is None and no_boxes.adjacency is None and no_boxes.index is None


def test_collate_images_degenerate_names_dataset_index():
    boxes = np.array([[[0, 0, 1, 1]], [[3, 0, 1, 1]]], dtype=np.float32)
    with pytest.raises(DegenerateBoxError, match="image 8, region 0"):
        collate_images(np.zeros((2, 1, 2), np.float32), boxes, index=[7, 8])


@pytest.mark.parametrize("repeated", [False, True])
def test_iter_image_batches_streams_split_in_order(tmp_path, precomp_write, repeated):
    ref = precomp_write(tmp_path, "test", n_images=7, repeated=repeated)
    split = PrecompSplit(tmp_path, "test")
    batches = list(iter_image_batches(split, batch_size=3, adjacency_threshold=0.2))
    assert [len(b) for b in batches] == [3, 3, 1]
    full = ImageBatch.cat(batches)
    assert full.index.tolist() == list(range(7))
    assert torch.equal(full.features, torch.from_numpy(ref["features"]))
    assert torch.equal(full.adjacency, adjacency(ref["boxes"], 0.2))


def test_iter_text_batches(tmp_path, precomp_write):
    caps = [f"cap {'x' * (i % 3)} end" for i in range(10)]
    precomp_write(tmp_path, "test", n_images=2, captions=caps)
    split = PrecompSplit(tmp_path, "test")
    batches = list(iter_text_batches(split, CharTokenizer(), batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert batches[0].tokens.tolist() == [[3, 3, 99], [3, 1, 3], [3, 2, 3], [3, 3, 99]]
    assert torch.cat([b.index for b in batches]).tolist() == list(range(10))
    assert torch.cat([b.caption_to_image for b in batches]).tolist() == [0] * 5 + [1] * 5


def test_pair_dataset_and_dataloader(tmp_path, precomp_write):
    ref = precomp_write(tmp_path, "train", n_images=4)
    split = PrecompSplit(tmp_path, "train")
    vocab = Vocabulary.build(split.captions, min_count=1)
    ds = PairDataset(split, vocab, adjacency_threshold=0.2)
    assert len(ds) == 20
    item = ds[13]
    assert (item.caption_index, item.image_index) == (13, 2)
    assert item.tokens == vocab.encode(ref["captions"][13])
    np.testing.assert_array_equal(item.features, ref["features"][2])

    batch = ds.collate([ds[i] for i in (13, 0, 14, 19)])
    assert isinstance(batch, PairBatch) and len(batch) == 4
    assert batch.image_ids.tolist() == [2, 0, 2, 3]
    assert batch.texts.caption_to_image.tolist() == [2, 0, 2, 3] and batch.texts.index.tolist() == [13, 0, 14, 19]
    assert batch.images.index.tolist() == [2, 0, 2, 3]
    assert torch.equal(batch.images.features, torch.from_numpy(ref["features"][[2, 0, 2, 3]]))
    assert torch.equal(batch.images.adjacency, adjacency(ref["boxes"][[2, 0, 2, 3]], 0.2))
    assert batch.texts.tokens[:, 0].tolist() == [vocab.start_id] * 4

    loader = DataLoader(ds, batch_size=6, shuffle=True, collate_fn=ds.collate,
                        generator=torch.Generator().manual_seed(0), num_workers=2)
    seen = torch.cat([b.texts.index for b in loader])
    assert sorted(seen.tolist()) == list(range(20))
    for b in loader:
        assert torch.equal(b.images.features, torch.from_numpy(ref["features"][b.image_ids.numpy()]))


def test_image_batch_cat_pads_regions_and_adjacency():
    import torch
    from tvrn.data.batch import ImageBatch

    def batch(b, r):
        adj = torch.eye(r, dtype=torch.bool).expand(b, r, r).clone()
        return ImageBatch(torch.ones(b, r, 3), torch.ones(b, r, dtype=torch.bool), torch.ones(b, r, 4), adj,
                          torch.arange(b))

    out = ImageBatch.cat([batch(2, 3), batch(1, 5)])
    assert out.features.shape == (3, 5, 3) and out.adjacency.shape == (3, 5, 5)
    assert out.mask[:2].sum(1).tolist() == [3, 3] and out.mask[2].all()
    assert not out.adjacency[0, 3:].any() and not out.adjacency[0, :, 3:].any()  # padded regions adjacent to none
    assert torch.equal(out.adjacency[2], torch.eye(5, dtype=torch.bool))
    assert out.index.tolist() == [0, 1, 0]
