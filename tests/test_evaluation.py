"""evaluation.py against naive loops, scikit-learn and hand-worked cases; the embedding cache."""
import doctest
import importlib.util
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import label_ranking_average_precision_score, ndcg_score, roc_auc_score

from llave_kit import analysis, data, evaluation
from llave_kit.analysis import indexed_similarity_chunks, similarity_stats
from llave_kit.data import write_records
from llave_kit.evaluation import (
    EmbeddedLists,
    candidate_list_metrics,
    cluster_embeddings,
    data_fingerprint,
    embed_eval_dataset,
    embed_in_batches,
    evaluate_eval_set,
    gallery_metrics,
    hardest_negatives,
    model_fingerprint,
    positive_ranks,
    project_2d,
    purity,
    ranking_metrics,
    read_eval_lists,
    score_candidate_lists,
    score_embedded_lists,
    score_eval_set,
)

# --------------------------------------------------------------------------------------------------
# Retrieval


def naive_ranks(query, cands, positives):
    """One query at a time: count candidates whose cosine is >= the positive's."""
    ranks = []
    for i, q in enumerate(query):
        candidates = cands[i] if cands.ndim == 3 else cands
        sims = [float(q @ c) / (np.linalg.norm(q) * np.linalg.norm(c)) for c in candidates]
        ranks.append(sum(s >= sims[positives[i]] for s in sims))
    return np.array(ranks)


@pytest.mark.parametrize("gallery", [False, True])
def test_chunked_ranks_equal_unchunked_and_a_per_query_loop(gallery):
    rng = np.random.default_rng(0)
    query = rng.normal(size=(13, 8))
    cands = rng.normal(size=(40, 8)) if gallery else rng.normal(size=(13, 12, 8))
    positives = rng.integers(0, cands.shape[-2], size=13)
    expected = naive_ranks(query, cands, positives)
    assert len(set(expected)) > 3  # the case is not trivial
    for chunk_size in (1, 5, 13, 1000):
        np.testing.assert_array_equal(positive_ranks(query, cands, positives, chunk_size), expected)
    metric_fn = gallery_metrics if gallery else candidate_list_metrics
    chunked = metric_fn(torch.tensor(query), cands, positives, chunk_size=2)
    assert chunked == metric_fn(query, cands, positives, chunk_size=1000)


@pytest.mark.parametrize("gallery", [False, True])
def test_hardest_negatives_equal_a_per_query_loop(gallery):
    rng = np.random.default_rng(3)
    query = rng.normal(size=(9, 8))
    cands = rng.normal(size=(30, 8)) if gallery else rng.normal(size=(9, 7, 8))
    positives = rng.integers(0, cands.shape[-2], size=9)
    for chunk_size in (2, 1000):
        columns, margins = hardest_negatives(query, cands, positives, chunk_size)
        for i, q in enumerate(query):
            candidates = cands[i] if cands.ndim == 3 else cands
            sims = candidates @ q / (np.linalg.norm(candidates, axis=1) * np.linalg.norm(q))
            wrong = [j for j in range(len(sims)) if j != positives[i]]
            best = max(wrong, key=lambda j: sims[j])
            assert columns[i] == best
            assert margins[i] == pytest.approx(sims[best] - sims[positives[i]])
    ranks = positive_ranks(query, cands, positives)
    np.testing.assert_array_equal(margins >= 0, ranks > 1)  # a failure is a margin >= 0
    with pytest.raises(ValueError, match="at least one wrong candidate"):
        hardest_negatives(query[:2], np.ones((2, 1, 8)))


def test_list_scores_are_the_ranks_and_table_1_statistics():
    rng = np.random.default_rng(4)
    query, cands = rng.normal(size=(11, 6)), rng.normal(size=(11, 4, 6))
    scores = score_candidate_lists(query, cands, k=5, chunk_size=3)
    np.testing.assert_array_equal(scores.ranks, positive_ranks(query, cands))
    stats = similarity_stats(query, cands, k=3)  # k lowered to C - 1
    for role in ("positive", "hard", "easy"):
        np.testing.assert_allclose(getattr(scores.stats, role), getattr(stats, role))
    assert scores.metrics(ks=(1, 2)) == {**candidate_list_metrics(query, cands, ks=(1, 2)),
                                         **stats.as_dict()}
    alone = score_candidate_lists(query, cands[:, :1])
    assert alone.stats is None and alone.n_candidates == 1
    assert alone.metrics() == candidate_list_metrics(query, cands[:, :1])
    with pytest.raises(ValueError, match="candidate lists"):
        score_candidate_lists(query, cands[0])


def test_ties_rank_the_positive_last():
    positive = np.array([1.0, 0.0])
    # A duplicate of the positive ties it; a collapsed embedder ties everything.
    duplicate = np.array([[positive, positive, [0.0, 1.0]]])  # (1, 3, 2)
    assert positive_ranks(positive[None], duplicate).tolist() == [2]
    collapsed_query = np.ones((4, 3))
    collapsed_cands = np.ones((4, 6, 3))
    assert positive_ranks(collapsed_query, collapsed_cands).tolist() == [6] * 4
    assert candidate_list_metrics(collapsed_query, collapsed_cands)["p@1"] == 0.0


def test_positive_first_ranks_ties_below_the_positive_as_argmax_does():
    query = np.array([[1.0, 0.0], [0.0, 1.0]])
    # Query 0: candidate 2 (longer, same direction) ties the positive exactly; candidate 1 is
    # worse. Query 1: candidate 1 beats the positive, candidate 2 ties it.
    cands = np.array([[[1.0, 0.0], [0.6, 0.8], [3.0, 0.0]],
                      [[0.6, 0.8], [0.0, 2.0], [0.6, 0.8]]])
    assert positive_ranks(query, cands).tolist() == [2, 3]
    assert positive_ranks(query, cands, ties="positive-first").tolist() == [1, 2]
    sims = np.einsum("qd,qcd->qc", query, cands / np.linalg.norm(cands, axis=2, keepdims=True))
    first = score_candidate_lists(query, cands, k=1, ties="positive-first")
    assert first.metrics()["p@1"] == np.mean(sims.argmax(axis=1) == 0) == 0.5
    assert score_candidate_lists(query, cands, k=1).metrics()["p@1"] == 0.0
    with pytest.raises(ValueError, match="ties must be one of"):
        positive_ranks(query, cands, ties="optimistic")


@pytest.mark.parametrize("ties", ["pessimistic", "positive-first"])
@pytest.mark.parametrize("chunk_size, max_gathered", [(1000, 2**23), (4, 2**23), (1000, 40)])
def test_indexed_lists_score_as_their_spelled_out_arrays(ties, chunk_size, max_gathered,
                                                         monkeypatch):
    monkeypatch.setattr(analysis, "MAX_GATHERED_VALUES", max_gathered)  # 40: one query a chunk
    rng = np.random.default_rng(5)
    table = rng.normal(size=(9, 6)).astype(np.float32)  # 9 distinct candidates, D = 6
    queries = rng.normal(size=(17, 6)).astype(np.float32)
    index = rng.integers(0, 9, size=(17, 7))  # lists of 7 drawn with repeats from 9
    index[:5, 3] = index[:5, 0]  # the positive repeated: exact ties
    embedded = EmbeddedLists(queries, table, index)
    scores = score_embedded_lists(embedded, k=3, ties=ties, chunk_size=chunk_size)

    lists = embedded.candidate_lists()  # (Q, C, D), the reference input
    assert lists.shape == (17, 7, 6)
    np.testing.assert_array_equal(scores.ranks, positive_ranks(queries, lists, ties=ties))
    expected_ranks, tied_queries = [], 0
    for q, candidates in zip(queries, lists):  # one query at a time, ties by the rule
        sims = [float(q @ c) / (np.linalg.norm(q) * np.linalg.norm(c)) for c in candidates]
        above = sum(s > sims[0] for s in sims) + 1
        ties_with_positive = sum(s == sims[0] for s in sims) - 1
        expected_ranks.append(above + (ties_with_positive if ties == "pessimistic" else 0))
        tied_queries += ties_with_positive > 0
    np.testing.assert_array_equal(scores.ranks, expected_ranks)
    assert tied_queries >= 5  # the rules differ on this data
    reference = similarity_stats(queries, lists, k=3)
    for role in ("positive", "hard", "easy"):
        np.testing.assert_allclose(getattr(scores.stats, role), getattr(reference, role),
                                   atol=1e-12)
    labels = np.r_[np.ones(17), np.zeros(17 * 3)]
    assert scores.stats.auroc == pytest.approx(
        roc_auc_score(labels, np.r_[reference.positive, reference.hard.ravel()]))


def test_indexed_similarity_chunks_reject_bad_input():
    query, table = np.ones((2, 3)), np.ones((4, 3))
    with pytest.raises(ValueError, match=r"index must be \(Q, C\) integers"):
        list(indexed_similarity_chunks(query, table, np.zeros((2, 3))))
    with pytest.raises(ValueError, match=r"each in \[0, 4\)"):
        list(indexed_similarity_chunks(query, table, np.full((2, 3), 4)))
    with pytest.raises(ValueError, match="2 queries but 3 candidate lists"):
        list(indexed_similarity_chunks(query, table, np.zeros((3, 3), dtype=int)))
    with pytest.raises(ValueError, match=r"table of candidates \(N, D\)"):
        list(indexed_similarity_chunks(query, np.ones((2, 4, 3)), np.zeros((2, 3), dtype=int)))


def test_ranking_metrics_hand_example():
    metrics = ranking_metrics(np.array([1, 2, 4, 11]), ks=(1, 5, 10))
    assert metrics["p@1"] == metrics["recall@1"] == 0.25
    assert metrics["recall@5"] == metrics["recall@10"] == 0.75
    assert metrics["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 11) / 4)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 4)
    assert metrics["ndcg@1"] == 0.25


def test_ranking_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    query, cands = rng.normal(size=(20, 6)), rng.normal(size=(20, 15, 6))
    metrics = candidate_list_metrics(query, cands, ks=(3, 10))
    unit_q = query / np.linalg.norm(query, axis=1, keepdims=True)
    unit_c = cands / np.linalg.norm(cands, axis=2, keepdims=True)
    scores = np.einsum("qd,qcd->qc", unit_q, unit_c)
    relevant = np.zeros_like(scores)
    relevant[:, 0] = 1
    # One relevant item: label-ranking average precision is 1 / rank, i.e. MRR.
    assert metrics["mrr"] == pytest.approx(label_ranking_average_precision_score(relevant, scores))
    for k in (3, 10):
        assert metrics[f"ndcg@{k}"] == pytest.approx(ndcg_score(relevant, scores, k=k))
    assert metrics["p@1"] == pytest.approx(np.mean(scores.argmax(axis=1) == 0))


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError, match="candidate lists"):
        candidate_list_metrics(np.ones((2, 3)), np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        gallery_metrics(np.ones((2, 3)), np.ones((2, 4, 3)))
    with pytest.raises(ValueError, match="ranks >= 1"):
        ranking_metrics(np.array([0, 1]))


# --------------------------------------------------------------------------------------------------
# Clustering


def test_purity_hand_example():
    labels = ["a", "a", "a", "b", "b", "c", "c", "c"]
    clusters = [0, 0, 1, 1, 1, 2, 2, 0]
    # cluster 0 = {a, a, c}: 2; cluster 1 = {a, b, b}: 2; cluster 2 = {c, c}: 2.
    assert purity(labels, clusters) == pytest.approx(6 / 8)


def test_cluster_embeddings_recovers_separated_directions():
    rng = np.random.default_rng(2)
    centres = np.eye(4, 16) * 5
    labels = np.repeat(np.arange(4), 15)
    emb = centres[labels] + rng.normal(scale=0.3, size=(60, 16))
    result = cluster_embeddings(emb, labels, seed=0)
    assert result.nmi == pytest.approx(1.0) and result.ari == pytest.approx(1.0)
    assert result.as_dict() == {"nmi": result.nmi, "ari": result.ari, "purity": 1.0,
                                "n_clusters": 4}
    shuffled = cluster_embeddings(emb, rng.permutation(labels), seed=0)
    assert shuffled.ari < 0.2


def test_project_2d_shapes_and_pca_variance():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(30, 8)) * np.array([5, 3, 1, 1, 1, 1, 1, 1])
    pca = project_2d(emb, method="pca")
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    eigenvalues = np.linalg.eigvalsh(np.cov(unit.T))[::-1]
    np.testing.assert_allclose(np.var(pca, axis=0, ddof=1), eigenvalues[:2], rtol=1e-8)
    tsne = project_2d(emb, method="tsne")
    assert tsne.shape == (30, 2) and np.isfinite(tsne).all()
    with pytest.raises(ValueError, match="method"):
        project_2d(emb, method="mds")


@pytest.mark.skipif(importlib.util.find_spec("umap") is not None, reason="umap-learn installed")
def test_project_2d_umap_without_package_names_it():
    with pytest.raises(ImportError, match="umap-learn"):
        project_2d(np.random.default_rng(0).normal(size=(10, 4)), method="umap")


# --------------------------------------------------------------------------------------------------
# Embedding with a cache


def image(value):
    return Image.new("RGB", (4, 4), (value, 0, 0))


class CountingEncoder:
    """encode_fn recording every batch it is given."""

    def __init__(self):
        self.batches = []

    def __call__(self, texts, images):
        self.batches.append((list(texts), list(images)))
        rows = [[len(t), sum(map(ord, t)) % 97, 0.0 if im is None else im.getpixel((0, 0))[0]]
                for t, im in zip(texts, images)]
        return torch.tensor(rows, dtype=torch.float32)


def test_embed_in_batches_batches_and_cache(tmp_path):
    texts = [f"item {i}" for i in range(7)]
    images = [image(i) if i % 2 else None for i in range(7)]
    encoder = CountingEncoder()
    fresh = embed_in_batches(encoder, texts, images, batch_size=3, cache_dir=tmp_path,
                             cache_key="model-a", progress=False)
    assert [len(b[0]) for b in encoder.batches] == [3, 3, 1]
    np.testing.assert_array_equal(fresh, encoder(texts, images).numpy())
    encoder.batches.clear()
    cached = embed_in_batches(encoder, texts, images, batch_size=3, cache_dir=tmp_path,
                              cache_key="model-a", progress=False)
    assert encoder.batches == [] and cached.dtype == np.float32
    np.testing.assert_array_equal(cached, fresh)
    assert [p.name.endswith(".npz") for p in tmp_path.iterdir()] == [True]  # no temporary files


@pytest.mark.parametrize("change", ["text", "image", "order", "key"])
def test_embedding_cache_misses_when_data_or_model_change(tmp_path, change):
    texts, images, key = ["a b", "c", "d"], [image(1), None, image(2)], "model-a"
    encoder = CountingEncoder()
    embed_in_batches(encoder, texts, images, cache_dir=tmp_path, cache_key=key, progress=False)
    if change == "text":
        texts = ["a b", "c!", "d"]
    elif change == "image":
        images = [image(1), None, image(3)]
    elif change == "order":
        texts, images = texts[::-1], images[::-1]
    else:
        key = "model-b"
    encoder.batches.clear()
    again = embed_in_batches(encoder, texts, images, cache_dir=tmp_path, cache_key=key,
                             progress=False)
    assert len(encoder.batches) == 1
    np.testing.assert_array_equal(again, encoder(texts, images).numpy())
    assert len(list(tmp_path.iterdir())) == 2


def test_embed_in_batches_writes_nothing_when_encoding_fails(tmp_path):
    def failing(texts, images):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        embed_in_batches(failing, ["a", "b"], cache_dir=tmp_path, cache_key="m", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_embed_in_batches_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="cache_key"):
        embed_in_batches(CountingEncoder(), ["a"], cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="as many images"):
        embed_in_batches(CountingEncoder(), ["a", "b"], [None], progress=False)
    with pytest.raises(ValueError, match="expected"):
        embed_in_batches(lambda t, i: torch.zeros(len(t) + 1, 3), ["a"], progress=False)
    with pytest.raises(ValueError, match="PIL"):
        data_fingerprint(["a"], [np.zeros((2, 2))])


class BagOfWordsEmbedder(torch.nn.Module):
    """A tiny deterministic stand-in for LmmEmbedder: word vectors + a linear map of pixels.

    Queries and targets share `encode`, as in TinyDualEmbedder."""

    def __init__(self, words, dim=16):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.index = {word: i for i, word in enumerate(words)}
        self.words = torch.nn.Parameter(torch.randn(len(words), dim, generator=generator))
        self.pixels = torch.nn.Parameter(torch.randn(3, dim, generator=generator))
        self.dropout = torch.nn.Dropout(0.5)  # must be off while embedding
        self.batch_sizes = []  # a list: plain attributes are part of the model fingerprint

    @property
    def encoded(self):
        return sum(self.batch_sizes)

    def encode(self, texts, images):
        self.batch_sizes.append(len(texts))
        rows = []
        for text, img in zip(texts, images):
            row = torch.zeros(self.words.shape[1])
            for word in text.split():
                row = row + self.words[self.index[word]]
            if img is not None:
                mean_pixel = torch.tensor(np.asarray(img, dtype=np.float32).mean(axis=(0, 1)))
                row = row + mean_pixel @ self.pixels
            rows.append(row)
        return F.normalize(self.dropout(torch.stack(rows)), dim=-1)

    def encode_queries(self, texts, images):
        return self.encode(texts, images)

    def encode_targets(self, texts, images):
        return self.encode(texts, images)


WORDS = "red green blue circle square cat dog".split()


def eval_items():
    """4 queries over 3 shared candidates; query 3 repeats a negative's text, so it misses."""
    candidates = (["red circle", "blue square", "green cat"], [None, image(9), None])
    rotate = [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    items = []
    for query, order in zip(["red circle", "blue square", "green cat", "blue square"], rotate):
        items.append({"query_text": query, "query_image": image(9) if "blue" in query else None,
                      "candidate_texts": [candidates[0][j] for j in order],
                      "candidate_images": [candidates[1][j] for j in order]})
    return items


def test_images_given_as_paths_are_decoded_per_batch_and_fingerprinted_by_file(tmp_path,
                                                                               monkeypatch):
    paths = []
    for value in (10, 20):
        paths.append(tmp_path / f"{value}.png")
        image(value).save(paths[-1])
    decoded = []
    decode = data._decode_rgb
    monkeypatch.setattr(data, "_decode_rgb", lambda path: decoded.append(path) or decode(path))
    monkeypatch.setattr(data.IMAGE_CACHE, "max_bytes", 0)  # every load decodes
    texts, images = ["a", "b", "c"], [paths[0], None, str(paths[1])]
    encoder = CountingEncoder()
    fingerprint = data_fingerprint(texts, images)
    assert decoded == []  # a path is fingerprinted by the file, not by its pixels
    from_paths = embed_in_batches(encoder, texts, images, batch_size=2, cache_dir=tmp_path,
                                  cache_key="m", progress=False)
    assert len(decoded) == 2 and [len(batch[0]) for batch in encoder.batches] == [2, 1]
    in_memory = [image(10), None, image(20)]
    np.testing.assert_array_equal(from_paths, encoder(texts, in_memory).numpy())
    decoded.clear()
    encoder.batches.clear()
    embed_in_batches(encoder, texts, images, cache_dir=tmp_path, cache_key="m", progress=False)
    assert decoded == [] and encoder.batches == []  # a cache hit opens no image
    image(30).save(paths[1])  # same size, new pixels and modification time
    os.utime(paths[1], ns=(1, 1))  # a time no earlier write can have had
    assert data_fingerprint(texts, images) != fingerprint
    with pytest.raises(FileNotFoundError, match="image not found: .*missing.png"):
        data_fingerprint(["a"], [tmp_path / "missing.png"])


def test_embed_eval_dataset_encodes_each_unique_candidate_once(tmp_path):
    model = BagOfWordsEmbedder(WORDS).train()
    items = eval_items()
    queries, cands = embed_eval_dataset(model, items, batch_size=2, cache_dir=tmp_path,
                                        progress=False)
    assert queries.shape == (4, 16) and cands.shape == (4, 3, 16)
    assert model.encoded == 4 + 3 and model.training  # 3 unique candidates; mode restored
    model.eval()
    for i, item in enumerate(items):
        with torch.no_grad():
            direct = model.encode(item["candidate_texts"], item["candidate_images"])
        np.testing.assert_allclose(cands[i], direct.numpy(), atol=1e-6)
    embed_eval_dataset(model, items, cache_dir=tmp_path, progress=False)
    assert model.encoded == 7 + 4 * 3  # only the direct loop above: the second call hit the cache


def test_evaluate_eval_set_scores_an_in_memory_eval_set():
    model = BagOfWordsEmbedder(WORDS)
    result = evaluate_eval_set(model, eval_items(), ks=(1, 2), progress=False)
    assert result["p@1"] == 0.75 and result["recall@2"] == 1.0
    assert result["mrr"] == pytest.approx((1 + 1 + 1 + 1 / 2) / 4)
    assert (result["queries"], result["candidates"], result["k"]) == (4, 3, 2)
    with torch.no_grad():
        miss = model.eval().encode(["blue square", "red circle"], [image(9), None])
    # Queries 0-2 equal their positives (cosine 1); query 3's positive is "red circle".
    assert result["positive"] == pytest.approx((3 + float(miss[0] @ miss[1])) / 4, abs=1e-6)


class InstructedEmbedder(BagOfWordsEmbedder):
    """Like LmmEmbedder: queries and targets get their own instruction word."""

    def encode_queries(self, texts, images):
        return self.encode([f"cat {t}" for t in texts], images)

    def encode_targets(self, texts, images):
        return self.encode([f"dog {t}" for t in texts], images)


def test_embed_eval_dataset_uses_query_and_target_encoders():
    model = InstructedEmbedder(WORDS).eval()
    items = eval_items()
    queries, cands = embed_eval_dataset(model, items, progress=False)
    with torch.no_grad():
        expected_queries = model.encode_queries([it["query_text"] for it in items],
                                                [it["query_image"] for it in items])
        expected_first = model.encode_targets(items[0]["candidate_texts"],
                                              items[0]["candidate_images"])
    np.testing.assert_allclose(queries, expected_queries.numpy(), atol=1e-6)
    np.testing.assert_allclose(cands[0], expected_first.numpy(), atol=1e-6)


def test_evaluate_eval_set_reads_an_mmeb_eval_file(tmp_path):
    items = eval_items()
    image(9).save(tmp_path / "blue.png")
    path = tmp_path / "eval" / "toy.jsonl"
    write_records(path, [{
        "qry_text": item["query_text"],
        "qry_img_path": "blue.png" if item["query_image"] else None,
        "tgt_text": item["candidate_texts"],
        "tgt_img_path": ["blue.png" if im else None for im in item["candidate_images"]],
    } for item in items], kind="eval")
    from_file = evaluate_eval_set(BagOfWordsEmbedder(WORDS), path, image_root=tmp_path,
                                  progress=False)
    in_memory = evaluate_eval_set(BagOfWordsEmbedder(WORDS), items, progress=False)
    assert from_file.keys() == in_memory.keys()
    for key, value in in_memory.items():
        assert from_file[key] == pytest.approx(value, abs=1e-6), key


def test_eval_set_rejects_ragged_and_incomplete_items():
    items = eval_items()
    items[2]["candidate_texts"] = items[2]["candidate_texts"][:2]
    items[2]["candidate_images"] = items[2]["candidate_images"][:2]
    with pytest.raises(ValueError, match="eval item 2 has 2 candidates"):
        embed_eval_dataset(BagOfWordsEmbedder(WORDS), items, progress=False)
    items = eval_items()
    del items[1]["query_image"]
    with pytest.raises(ValueError, match=r"eval item 1 lacks \['query_image'\]"):
        embed_eval_dataset(BagOfWordsEmbedder(WORDS), items, progress=False)


class Tokenizer:
    def __init__(self, words):
        self.words = words

    def get_vocab(self):
        return {word: i for i, word in enumerate(self.words)}


class Processor:
    def __init__(self, words, size=56):
        self.tokenizer, self.size = Tokenizer(words), size

    def to_json_string(self):
        return f'{{"size": {self.size}}}'


def test_model_fingerprint_follows_weights_and_settings_but_not_train_mode():
    model = BagOfWordsEmbedder(WORDS)
    model.processor, model.instruction = Processor(WORDS), None
    before = model_fingerprint(model)
    assert model_fingerprint(model.eval()) == before
    assert model_fingerprint(model, extra="v2") != before
    changes = [("instruction", "find the image"), ("processor", Processor(WORDS, size=28)),
               ("processor", Processor(WORDS[::-1]))]  # same size, other token ids
    for attribute, value in changes:
        original = getattr(model, attribute)
        setattr(model, attribute, value)
        assert model_fingerprint(model) != before, attribute
        setattr(model, attribute, original)
    assert model_fingerprint(model) == before
    with torch.no_grad():
        model.pixels[0, 0] += 1e-3
    assert model_fingerprint(model) != before


def test_module_examples_run():
    assert doctest.testmod(evaluation).failed == 0


def test_one_image_under_two_names_is_one_candidate_and_ties_exactly(tmp_path):
    image(9).save(tmp_path / "blue.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "blue.png").read_bytes())
    image(3).save(tmp_path / "other.png")
    path = tmp_path / "lists.jsonl"
    write_records(path, [{"qry_text": "blue square", "qry_img_path": None,
                          "tgt_text": ["blue square", "blue square", "red circle"],
                          "tgt_img_path": ["blue.png", "copy.png", "other.png"]}], kind="eval")
    lists = read_eval_lists(path, image_root=tmp_path)
    assert lists.index.tolist() == [[0, 0, 1]]  # the copy is the positive's own row
    assert [p.name for p in lists.candidate_images] == ["blue.png", "other.png"]
    model = BagOfWordsEmbedder(WORDS)
    ranks = {ties: score_eval_set(model, path, ties=ties, progress=False).ranks.tolist()
             for ties in ("pessimistic", "positive-first")}
    assert ranks == {"pessimistic": [2], "positive-first": [1]}  # an exact tie, either way
    (tmp_path / "copy.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists.jsonl:1: image not found: .*copy.png"):
        read_eval_lists(path, image_root=tmp_path)
