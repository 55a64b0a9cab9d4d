import pytest
import torch

from _train_toy import ToyModel, image_batches, make_split, text_batches
from tvrn.scoring import encode_images, encode_texts, plan_blocks, score_all
from tvrn.tensors import cat_fields


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = ToyModel().eval()
    split = make_split(9, caps_per_image=3, seed=3)
    ei = encode_images(model, image_batches(split, 4))
    et = encode_texts(model, text_batches(split, 5))
    return model, split, ei, et


def test_encode_concatenates_in_order_with_padding(setup):
    from tvrn.data.batch import TextBatch

    model, split, ei, et = setup
    assert len(ei) == 9 and len(et) == 27
    full = model.encode_text(TextBatch(split["tokens"], split["token_mask"]))
    L = et.words.shape[1]
    assert torch.equal(et.mask, split["token_mask"][:, :L])
    assert torch.allclose(et.words[et.mask], full.words[:, :L][et.mask], atol=1e-6)
    lengths = []
    for k, tb in enumerate(text_batches(split, 5)):  # batches were trimmed to their own longest caption
        assert (et.words[5 * k : 5 * k + 5, tb.tokens.shape[1] :] == 0).all()  # cat padding is zeros
        lengths.append(tb.tokens.shape[1])
    assert len(set(lengths)) > 1  # the padding path was exercised


def test_cat_fields_generic():
    from dataclasses import dataclass

    @dataclass
    class Enc:
        x: torch.Tensor
        word_mask: torch.Tensor
        adj: torch.Tensor
        note: str = "a"
        opt: object = None

    a = Enc(torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3, 3, dtype=torch.bool))
    b = Enc(torch.ones(1, 5, 4), torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 5, 5, dtype=torch.bool))
    c = cat_fields([a, b])
    assert c.x.shape == (3, 5, 4) and c.word_mask.shape == (3, 5) and c.adj.shape == (3, 5, 5)
    assert c.word_mask[:2, 3:].sum() == 0 and c.x[:2, 3:].abs().sum() == 0 and c.adj[:2, 3:, :].sum() == 0
    assert c.note == "a" and c.opt is None
    with pytest.raises(ValueError):
        cat_fields([a, Enc(b.x, b.word_mask, b.adj, note="b")])
    assert torch.equal(cat_fields([torch.ones(2, 3), torch.zeros(1, 3)]), torch.tensor([[1.0] * 3] * 2 + [[0.0] * 3]))


@pytest.mark.parametrize("bi,bt", [(1, 1), (2, 5), (4, 27), (9, 4), (100, 100)])
def test_blocked_equals_single_block(setup, bi, bt):
    model, _, ei, et = setup
    ref = score_all(model, ei, et, block_images=100, block_texts=100)
    got = score_all(model, ei, et, block_images=bi, block_texts=bt)
    assert got.dtype == torch.float32 and got.shape == (9, 27)
    assert torch.allclose(got, ref, atol=1e-6, rtol=0)


def test_scores_match_direct_forward(setup):
    model, split, ei, et = setup
    from tvrn.data.batch import ImageBatch, TextBatch

    with torch.no_grad():
        direct = model(ImageBatch(split["features"], split["region_mask"]), TextBatch(split["tokens"], split["token_mask"]))
    assert torch.allclose(score_all(model, ei, et, block_images=2, block_texts=7), direct, atol=1e-6)


def test_permuting_gallery_permutes_scores(setup):
    model, _, ei, et = setup
    ref = score_all(model, ei, et, block_images=4, block_texts=6)
    pi = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    pt = torch.randperm(27, generator=torch.Generator().manual_seed(2))
    got = score_all(model, ei[pi], et[pt], block_images=4, block_texts=6)
    assert torch.allclose(got, ref[pi][:, pt], atol=1e-6)


def test_memory_budget_plans_blocks(setup):
    model, _, ei, et = setup
    per_pair = model.pair_bytes(ei[:1], et[:1])
    bi, bt = plan_blocks(model, ei, et, block_images=100, block_texts=10, memory_budget_mb=per_pair * 25 / 2**20)
    assert bt == 10 and bi == 2  # 25 pairs: 10 captions x 2 images
    assert plan_blocks(model, ei, et, 3, 4) == (3, 4)
    ref = score_all(model, ei, et)
    got = score_all(model, ei, et, block_texts=10, memory_budget_mb=per_pair * 25 / 2**20)
    assert torch.allclose(got, ref, atol=1e-6)


def test_restores_training_mode_and_no_grad(setup):
    model, _, ei, et = setup
    model.train()
    try:
        s = score_all(model, ei, et)
        assert model.training and not s.requires_grad
        # eval mode inside: dropout off, so two calls agree exactly
        assert torch.equal(s, score_all(model, ei, et))
    finally:
        model.eval()


def test_empty_gallery(setup):
    model, _, ei, et = setup
    assert score_all(model, ei[:0], et).shape == (0, 27)


def test_tvrn_budgeted_length_sorted_blocks_equal_one_block():
    """Real model, mixed caption lengths in gallery order: budgeted blocks over length-sorted captions give the
    single-block scores in gallery order; the plan caps captions per block for length-grouping models."""
    from helpers import build, make_images, make_texts

    model = build("tvrn_sgr")
    with torch.no_grad():
        ei = model.encode_image(make_images(5))
        et = model.encode_text(make_texts(model, 11, lengths=(7, 2, 5, 3, 7, 2, 4)))
        ref = model._score_plain(ei, et)  # (5, 11) plain masked computation
    per_pair = model.pair_bytes(ei[:1], et[:1])
    budget = per_pair * 12 / 2**20  # 12 pairs per block
    bi, bt = plan_blocks(model, ei, et, memory_budget_mb=budget)
    assert bt == 3 and bi == 4  # 11 captions / 5 lengths -> 3 per block
    got = score_all(model, ei, et, memory_budget_mb=budget)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(score_all(model, ei, et, memory_budget_mb=None), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tvrn_sgr", "sgraf_sgr", "scan_t2i", "vse"])
def test_autocast_bf16_runs_fast_paths(name):
    """CPU bf16 autocast stands in for CUDA bf16 / fp16: the fast paths keep one dtype through their loops."""
    from helpers import build, make_images, make_texts

    model = build(name)
    images, texts = make_images(4), make_texts(model, 6, lengths=(7, 5, 3, 5, 2, 7))
    ref = score_all(model, encode_images(model, [images]), encode_texts(model, [texts]))
    ei = encode_images(model, [images], autocast_dtype=torch.bfloat16)
    et = encode_texts(model, [texts], autocast_dtype=torch.bfloat16)
    got = score_all(model, ei, et, autocast_dtype=torch.bfloat16)
    assert got.dtype == torch.float32 and (got - ref).abs().max() < 0.05


def test_caption_blocks_cut_at_length_changes():
    from tvrn.scoring.plan import _caption_blocks

    lengths = torch.tensor([2, 2, 2, 3, 5, 5, 5, 5, 5, 7])  # visiting order, sorted
    blocks = _caption_blocks(10, 3, lengths)
    assert blocks == [(0, 3), (3, 4), (4, 6), (6, 9), (9, 10)]  # the run of five 5s: 2 + 3, not 3 + 2 left over
    covered = [p for p0, p1 in blocks for p in range(p0, p1)]
    assert covered == list(range(10))
    assert all(len(set(lengths[p0:p1].tolist())) == 1 and p1 - p0 <= 3 for p0, p1 in blocks)
    assert _caption_blocks(10, 4, None) == [(0, 4), (4, 8), (8, 10)]


@pytest.mark.parametrize("name", ["sgraf_sgr", "scan_t2i"])
def test_length_grouping_models_get_trimmed_one_length_blocks(name):
    """score_all hands a length-grouping model blocks of captions of one length, cut to that length (no padded
    word), gives each block as many images as the budget allows at its length, and keeps every score."""
    from helpers import build, make_images, make_texts

    model = build(name)
    with torch.no_grad():
        ei = model.encode_image(make_images(7))
        et = model.encode_text(make_texts(model, 13, lengths=(7, 2, 5, 2, 7, 3)))
        ref = model._score_plain(ei, et)  # (7, 13) plain masked computation, gallery order
    calls = []

    def spy(images, texts):  # instance attribute: score_all calls model.score
        calls.append((len(images), len(texts), texts.words.shape[1], bool(texts.mask.all())))
        return type(model).score(model, images, texts)

    model.score = spy
    budget = model.pair_bytes(ei[:1], et[:1]) * 8  # bytes: 8 pairs at the longest caption (7 words)
    got = score_all(model, ei, et, memory_budget_mb=budget / 2**20)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    lengths = et.mask.sum(1)
    assert sum(ni * nt for ni, nt, _, _ in calls) == 7 * 13  # every pair scored once
    for ni, nt, n, all_real in calls:
        assert all_real and nt <= int((lengths == n).sum())  # one length, cut to it
        pairs_n = budget // model.pair_bytes(ei[:1], et[lengths == n][:1].trim(n))  # pairs at n words
        bi = max(1, min(7, pairs_n // nt))
        assert ni == bi or ni == 7 % bi  # full chunks of bi images, then the rest
    short = [ni for ni, nt, n, _ in calls if n == 2 and nt == 4]  # the four two-word captions in one block
    long = [ni for ni, nt, n, _ in calls if n == 7 and nt == 3]  # five seven-word captions: blocks of 3 and 2
    assert short and long and max(short) > max(long)  # shorter captions: more images per block


def test_captions_with_inner_padding_are_not_cut():
    """A mask that is not a prefix of True (padding inside a caption): score_all must not cut captions to their
    word count (that would drop real words); the scores equal the plain masked computation."""
    from dataclasses import replace

    from helpers import build, make_images, make_texts
    from tvrn.scoring.plan import _prefix_lengths

    model = build("sgraf_sgr")
    with torch.no_grad():
        ei = model.encode_image(make_images(3))
        et = model.encode_text(make_texts(model, 5, lengths=(7, 5, 3)))
        mask = et.mask.clone()
        mask[0, 1] = False  # caption 0: words 0, 2..6 real
        et = replace(et, mask=mask)
        ref = model._score_plain(ei, et)
    assert _prefix_lengths(et) is None and _prefix_lengths(replace(et, mask=et.mask & False)) is None
    torch.testing.assert_close(score_all(model, ei, et, memory_budget_mb=0.01), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tvrn_sgr", "scan_t2i", "vse"])
def test_shards_of_the_plan_sum_to_the_single_process_matrix_bit_for_bit(name):
    """score_all(shard=(r, w)): every work unit of the whole gallery's plan is scored by exactly one rank, with the
    single-process block shapes, so the zero-padded shards sum to the single-process matrix exactly, for any w
    (also w larger than the number of units: idle ranks give zeros)."""
    from helpers import build, make_images, make_texts
    from tvrn.scoring import block_plan, plan_units, shard_units

    model = build(name)
    with torch.no_grad():
        ei = model.encode_image(make_images(9))
        et = model.encode_text(make_texts(model, 14, lengths=(7, 2, 5, 3, 7, 4, 2)))
    budget = model.pair_bytes(ei[:1], et[:1]) * 10 / 2**20  # about 10 pairs per block: many units
    kw = dict(memory_budget_mb=budget, block_texts=4)
    full = score_all(model, ei, et, **kw)
    _, plan = block_plan(model, ei, et, block_texts=4, memory_budget_mb=budget)
    units = plan_units(plan, 9)
    assert len(units) >= 6
    covered = torch.zeros(9, 14, dtype=torch.long)  # the units tile the matrix once (columns in visiting order)
    for e, i0, i1 in units:
        covered[i0:i1, plan[e][0]:plan[e][1]] += 1
    assert bool((covered == 1).all())
    for world in (1, 2, 3, len(units) + 2):
        shares = [shard_units(units, plan, r, world) for r in range(world)]
        assert [u for s in shares for u in s] == units  # contiguous runs, in order, each unit once
        shards = [score_all(model, ei, et, shard=(r, world), **kw) for r in range(world)]
        total = torch.stack(shards).sum(0)
        assert torch.equal(total, full), (world, float((total - full).abs().max()))
        for r, (s, share) in enumerate(zip(shards, shares)):  # a rank writes its own units and nothing else
            mine = torch.zeros(9, 14, dtype=torch.bool)
            for e, i0, i1 in share:
                p0, p1, _, _ = plan[e]
                mine[i0:i1, p0:p1] = True
            order, _ = block_plan(model, ei, et, block_texts=4, memory_budget_mb=budget)
            if order is not None:  # visiting positions -> gallery columns
                mine = torch.zeros_like(mine).index_copy_(1, order, mine)
            assert bool((s[~mine] == 0).all()) and torch.equal(s[mine], full[mine])
        if world <= 3:  # fewer ranks than units: nobody idles
            assert all(shares)


def test_shard_units_balances_cost_and_rejects_bad_ranks():
    from tvrn.scoring import plan_units, shard_units

    plan = [(0, 4, 2, 5), (4, 8, 8, 5)]  # 4 two-word and 4 eight-word captions, chunks of 5 of 10 images
    units = plan_units(plan, 10)
    assert units == [(0, 0, 5), (0, 5, 10), (1, 0, 5), (1, 5, 10)]
    assert shard_units(units, plan, 0, 2) == units[:3] and shard_units(units, plan, 1, 2) == units[3:]  # 40 / 160 / 160
    with pytest.raises(ValueError, match="rank 2 is not in"):
        shard_units(units, plan, 2, 2)
