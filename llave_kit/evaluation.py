"""Evaluate embedders: MMEB-style retrieval, clustering, and embedding data sets with a disk cache.

Retrieval. Each query has one positive among its candidates: its own MMEB candidate list
(cand_emb (Q, C, D), positive usually candidate 0) or a shared gallery (N, D). Scores are cosine
similarities, computed `chunk_size` queries at a time (see `analysis.similarity_chunks`), so a
large gallery never builds the full (Q, N) matrix. Two tie rules, chosen by `ties`:

    "pessimistic"     rank = #{candidates j : s_j >= s_positive}   (the positive counts itself once)
    "positive-first"  rank = 1 + #{candidates j : s_j > s_positive}

The kit's default is pessimistic: a candidate that ties the positive is ranked above it, so a
collapsed embedder that scores everything equally gets P@1 = 0, not 1. MMEB's and LLaVE's
evaluator takes `argmax(scores) == 0`, and argmax returns the first of equal maxima, so it credits
ties to the positive (candidate 0): that is "positive-first", the rule behind published MMEB
numbers. The two agree unless a candidate scores exactly like the positive (a duplicate of it,
or collapsed embeddings).

Clustering. k-means on L2-normalised embeddings, scored against labels by NMI and ARI
(scikit-learn's) and purity; 2-D projections for plots.

Embedding. `embed_in_batches` runs any `encode_fn(texts, images) -> (n, D)` over a data set in
batches with a tqdm bar and, given `cache_dir`, caches the result in an .npz keyed by the caller's
model key and a fingerprint of the data, written atomically. An image may be given as a path: it is
decoded only when its batch is embedded, and fingerprinted by the file (path, size, mtime), so a
cache hit decodes nothing.

MMEB eval sets (1000 candidates per query, drawn from a much smaller pool), in three steps that
every table of the kit goes through; memory grows with the distinct items, not with Q x C:

1. `read_eval_lists`: the queries, each distinct candidate once, and an index (Q, C) into them.
   Candidates are told apart by text and image file content, straight from the records: each
   distinct path's bytes are hashed once and nothing is decoded yet (in-memory items: by text and
   pixels). One image saved under several names is embedded once, so its copies tie exactly.
2. `embed_eval_lists`: embeds the queries with the embedder's `encode_queries` and the distinct
   candidates with `encode_targets`, a batch of images decoded at a time (an `EmbeddedLists`).
3. `score_embedded_lists`: ranks and Table-1 similarities per query (a `ListScores`), a chunk of
   queries at a time (`analysis.indexed_similarity_chunks`), never all lists (Q, C, D) at once.

`score_eval_set` does 2 and 3, `evaluate_eval_set` returns the means for one eval file or data set.
For small sets, `embed_eval_dataset` spells the lists out as (Q, C, D) and `score_candidate_lists`
scores such arrays.

Example, on hand-made embeddings (2 queries, lists of 3 candidates, candidate 0 the positive):

    >>> import numpy as np
    >>> from llave_kit.evaluation import evaluate_eval_set, score_candidate_lists
    >>> queries = np.array([[1.0, 0.0], [0.0, 1.0]])                             # (Q, D)
    >>> candidates = np.array([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]],             # (Q, C, D)
    ...                        [[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]]])
    >>> scores = score_candidate_lists(queries, candidates, k=1)
    >>> scores.ranks                    # query 1's wrong candidate [0, 1] beats its positive
    array([1, 2])
    >>> metrics = scores.metrics(ks=(1,))       # means over queries
    >>> metrics["p@1"], metrics["mrr"], round(metrics["positive"], 3), round(metrics["hard"], 3)
    (0.5, 0.75, 0.9, 0.8)

and on an eval set in memory (the items `data.EvalDataset` yields; a path to an MMEB eval file
works the same), embedded by an untrained tiny model:

    >>> from llave_kit.dual_encoder import TinyDualEmbedder
    >>> embedder = TinyDualEmbedder.build(["a red circle", "a blue square"])
    >>> pairs = [("a red circle", "a blue square"), ("a blue square", "a red circle")]
    >>> items = [{"query_text": text, "query_image": None, "candidate_texts": [text, other],
    ...           "candidate_images": [None, None]} for text, other in pairs]
    >>> result = evaluate_eval_set(embedder, items, k=1, progress=False)
    >>> result["p@1"], result["queries"], result["candidates"]
    (1.0, 2, 2)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from llave_kit.analysis import (
    SimilarityStats,
    as_float_array,
    concatenate_stats,
    indexed_similarity_chunks,
    l2_normalize,
    similarity_chunks,
    stats_of_similarities,
    to_numpy,
)
from llave_kit.data import EvalDataset, load_image
from llave_kit.files import atomic_path
from llave_kit.progress import progress_bar

if TYPE_CHECKING:  # annotations only: importing encoders loads transformers
    from llave_kit.encoders import Embedder

EncodeFn = Callable[[list, list], "torch.Tensor | np.ndarray"]


# --------------------------------------------------------------------------------------------------
# Retrieval


TIE_RULES = ("pessimistic", "positive-first")


def check_tie_rule(ties: str) -> None:
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {list(TIE_RULES)}, got {ties!r}")


def ranks_from_similarities(sims: np.ndarray, positives: np.ndarray,
                            ties: str = "pessimistic") -> np.ndarray:
    """Rank of each row's positive among its columns: sims (n, C), positives (n,) columns.

    ties: "pessimistic" ranks a candidate that ties the positive above it, "positive-first"
    below it (module doc).
    """
    check_tie_rule(ties)
    positive = sims[np.arange(len(sims)), positives][:, None]  # (n, 1)
    if ties == "pessimistic":
        return (sims >= positive).sum(axis=1)
    return 1 + (sims > positive).sum(axis=1)


def positive_ranks(query_emb, cand_emb, positive_index=None, chunk_size: int = 256,
                   ties: str = "pessimistic") -> np.ndarray:
    """Rank of each query's positive among its candidates, (Q,) ints >= 1 (tie rules: module doc).

    cand_emb: candidate lists (Q, C, D) or a gallery (N, D); positive_index (Q,) ints, None =
    candidate 0 (lists) or gallery row i (paired data).
    """
    check_tie_rule(ties)
    ranks = [ranks_from_similarities(sims, positives, ties)
             for _, sims, positives in similarity_chunks(query_emb, cand_emb, positive_index,
                                                         chunk_size)]
    return np.concatenate(ranks).astype(np.int64)


def hardest_negatives(query_emb, cand_emb, positive_index=None,
                      chunk_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Each query's most similar wrong candidate: its column (Q,) and its margin (Q,),
    s_wrong - s_positive. A margin >= 0 means the query misses rank 1 (tie rule: module doc).

    cand_emb and positive_index as in `positive_ranks`; every query needs a wrong candidate.
    """
    columns, margins = [], []
    for _, sims, positives in similarity_chunks(query_emb, cand_emb, positive_index, chunk_size):
        if sims.shape[1] < 2:
            raise ValueError("hardest_negatives needs at least one wrong candidate per query")
        rows = np.arange(len(sims))
        wrong = sims.copy()
        wrong[rows, positives] = -np.inf
        best = wrong.argmax(axis=1)  # (n,) the first of equally similar wrong candidates
        columns.append(best)
        margins.append(sims[rows, best] - sims[rows, positives])
    return np.concatenate(columns), np.concatenate(margins)


def ranking_metrics(ranks, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Metrics of one relevant item per query at rank r_i, averaged over queries.

        p@1      = mean 1[r_i = 1]                  (MMEB's metric)
        recall@k = mean 1[r_i <= k]
        mrr      = mean 1 / r_i
        ndcg@k   = mean 1[r_i <= k] / log2(1 + r_i)  (ideal DCG is 1 with one relevant item)
    """
    ranks = to_numpy(ranks)
    if ranks.ndim != 1 or len(ranks) == 0 or ranks.min() < 1:
        raise ValueError(f"ranks must be a non-empty 1-D array of ranks >= 1, got {ranks!r}")
    metrics = {"p@1": float(np.mean(ranks == 1)), "mrr": float(np.mean(1.0 / ranks))}
    for k in ks:
        metrics[f"recall@{k}"] = float(np.mean(ranks <= k))
        metrics[f"ndcg@{k}"] = float(np.mean(np.where(ranks <= k, 1 / np.log2(1 + ranks), 0.0)))
    return metrics


def candidate_list_metrics(
    query_emb, cand_emb, positive_index=None, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 256
) -> dict[str, float]:
    """`ranking_metrics` over MMEB candidate lists: query_emb (Q, D), cand_emb (Q, C, D)."""
    _check_lists(cand_emb)
    return ranking_metrics(positive_ranks(query_emb, cand_emb, positive_index, chunk_size), ks)


def _check_lists(cand_emb) -> None:
    if np.ndim(cand_emb) != 3:
        raise ValueError(f"cand_emb must be candidate lists (Q, C, D), got {np.shape(cand_emb)}")


def gallery_metrics(
    query_emb, gallery_emb, positive_index=None, ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 256,
) -> dict[str, float]:
    """`ranking_metrics` against one shared gallery: query_emb (Q, D), gallery_emb (N, D)."""
    if np.ndim(gallery_emb) != 2:
        raise ValueError(f"gallery_emb must have shape (N, D), got {np.shape(gallery_emb)}")
    return ranking_metrics(positive_ranks(query_emb, gallery_emb, positive_index, chunk_size), ks)


# --------------------------------------------------------------------------------------------------
# Clustering


def purity(labels, clusters) -> float:
    """Purity = (1/n) sum_v max_u n_uv: the share of items in their cluster's majority class."""
    table = contingency_matrix(to_numpy(labels), to_numpy(clusters))  # (classes, clusters)
    return float(table.max(axis=0).sum() / table.sum())


@dataclass(frozen=True)
class ClusteringResult:
    clusters: np.ndarray  # (N,) k-means cluster of each embedding
    nmi: float
    ari: float
    purity: float

    def as_dict(self) -> dict[str, float]:
        return {"nmi": self.nmi, "ari": self.ari, "purity": self.purity,
                "n_clusters": len(np.unique(self.clusters))}


def cluster_embeddings(
    emb, labels, n_clusters: int | None = None, seed: int = 0
) -> ClusteringResult:
    """k-means (k-means++, 10 restarts) on L2-normalised embeddings, scored against `labels`.

    Rows are normalised first so clusters follow cosine similarity, the geometry the embedder is
    trained and used in. n_clusters defaults to the number of distinct labels.
    """
    x = l2_normalize(as_float_array(emb, "emb"), "emb")
    labels = to_numpy(labels)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"emb (N, D) and labels (N,) disagree: {x.shape} vs {labels.shape}")
    n_clusters = n_clusters or len(np.unique(labels))
    clusters = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(x)
    return ClusteringResult(clusters, float(normalized_mutual_info_score(labels, clusters)),
                            float(adjusted_rand_score(labels, clusters)), purity(labels, clusters))


def project_2d(
    emb, method: str = "tsne", seed: int = 0, perplexity: float | None = None
) -> np.ndarray:
    """(N, 2) coordinates of L2-normalised embeddings for a scatter plot.

    method: "pca" (linear, exact), "tsne" (scikit-learn, cosine metric, PCA init; perplexity
    defaults to min(30, (N - 1) / 3)) or "umap" (needs the optional `umap-learn` package).
    Distances in t-SNE and UMAP plots show neighbourhoods, not global geometry.
    """
    x = l2_normalize(as_float_array(emb, "emb"), "emb")
    if x.ndim != 2 or len(x) < 3:
        raise ValueError(f"emb must have shape (N >= 3, D), got {x.shape}")
    if method == "pca":
        centred = x - x.mean(axis=0)
        return centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = perplexity or min(30.0, (len(x) - 1) / 3)
        return TSNE(2, perplexity=perplexity, metric="cosine", init="pca",
                    random_state=seed).fit_transform(x)
    if method == "umap":
        try:
            import umap
        except ImportError as error:
            raise ImportError("method='umap' needs umap-learn: "
                              "pip install 'llave-kit[umap]'") from error
        return umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(x)
    raise ValueError(f"method must be 'pca', 'tsne' or 'umap', got {method!r}")


# --------------------------------------------------------------------------------------------------
# Fingerprints


def _is_path(image) -> bool:
    return isinstance(image, (str, os.PathLike))


def _image_digest(image) -> bytes:
    """What identifies an image: its pixels, or for a path the file, without decoding it."""
    if image is None:
        return b"no image"
    if _is_path(image):
        try:
            stat = os.stat(image)
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {image}") from None
        return f"file {os.path.abspath(image)} {stat.st_size} {stat.st_mtime_ns}".encode()
    if not hasattr(image, "tobytes") or not hasattr(image, "mode"):
        raise ValueError(f"images must be PIL images, paths or None, got {type(image).__name__}")
    return hashlib.sha256(f"{image.mode} {image.size}".encode() + image.tobytes()).digest()


def data_fingerprint(texts: Sequence[str], images: Sequence | None = None) -> str:
    """sha256 over every (text, image) pair, in order: changes if any input changes.

    A PIL image counts by its pixels; an image given as a path by its absolute path, size and
    modification time (ns), so fingerprinting a large eval set decodes nothing. (A file rewritten
    with the same size within one tick of the file system's clock would go unnoticed.)
    """
    images = [None] * len(texts) if images is None else images
    digest = hashlib.sha256()
    for text, image in zip(texts, images, strict=True):
        for part in (text.encode("utf-8"), _image_digest(image)):
            digest.update(len(part).to_bytes(8, "little") + part)  # length prefix: no ambiguity
    return digest.hexdigest()


def _model_settings(model: torch.nn.Module) -> list[str]:
    """What besides the weights decides the embeddings, as sorted strings.

    Configs of the model and its submodules (HF `to_json_string`), a `processor` attribute's
    settings and its tokenizer's vocabulary (as `LmmEmbedder` has), and the model's plain
    attributes (e.g. instructions), except the train/eval flag; so a plain attribute that changes
    on every call (a counter) makes every lookup miss -- keep such state in a container.
    """
    parts = {module.config.to_json_string() for module in model.modules()
             if hasattr(getattr(module, "config", None), "to_json_string")}
    processor = getattr(model, "processor", None)
    if hasattr(processor, "to_json_string"):
        parts.add(processor.to_json_string())
    tokenizer = getattr(processor, "tokenizer", None)
    if hasattr(tokenizer, "get_vocab"):
        parts.add(json.dumps(sorted(tokenizer.get_vocab().items())))
    plain = {key: value for key, value in vars(model).items()
             if key != "training" and isinstance(value, (str, int, float, bool, type(None)))}
    parts.add(json.dumps(sorted(plain.items())))
    return sorted(parts)


def model_fingerprint(model: torch.nn.Module, extra: str = "") -> str:
    """sha256 over the model's class, `_model_settings`, every state_dict tensor, and `extra`.

    Anything else that changes the embeddings (preprocessing kept elsewhere) belongs in `extra`.
    Hashes every weight byte (about 1 s per GB).
    """
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for part in [*_model_settings(model), extra]:
        digest.update(len(part).to_bytes(8, "little") + part.encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Embedding in batches, with a disk cache


def _decoded(image):
    """A PIL image or None; an image given as a path is opened here, when its batch is due."""
    return load_image(image) if _is_path(image) else image


def _encode_all(encode_fn, texts, images, batch_size, progress, desc) -> np.ndarray:
    chunks = []
    with torch.no_grad(), progress_bar(total=len(texts), desc=desc, disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            batch_texts = list(texts[start:start + batch_size])
            batch_images = [_decoded(image) for image in images[start:start + batch_size]]
            out = to_numpy(encode_fn(batch_texts, batch_images))
            if out.ndim != 2 or len(out) != len(batch_texts):
                raise ValueError(f"encode_fn returned shape {out.shape} for a batch of "
                                 f"{len(batch_texts)}; expected ({len(batch_texts)}, D)")
            if chunks and out.shape[1] != chunks[0].shape[1]:
                raise ValueError(f"encode_fn changed dimension: {chunks[0].shape[1]} -> "
                                 f"{out.shape[1]}")
            chunks.append(out.astype(np.float32))
            bar.update(len(batch_texts))
    return np.concatenate(chunks)


def _cache_path(cache_dir, cache_key: str, fingerprint: str) -> Path:
    name = hashlib.sha256(f"{cache_key}\n{fingerprint}".encode()).hexdigest()[:32]
    return Path(cache_dir) / f"embeddings-{name}.npz"


def _load_cached(path: Path, cache_key: str, fingerprint: str, n: int) -> np.ndarray:
    with np.load(path, allow_pickle=False) as stored:
        if (str(stored["cache_key"]), str(stored["data_fingerprint"])) != (cache_key, fingerprint):
            raise ValueError(f"embedding cache {path} belongs to other inputs; delete it")
        embeddings = stored["embeddings"]
    if len(embeddings) != n:
        raise ValueError(f"embedding cache {path} holds {len(embeddings)} rows, expected {n}")
    return embeddings


def embed_in_batches(
    encode_fn: EncodeFn,
    texts: Sequence[str],
    images: Sequence | None = None,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    cache_key: str | None = None,
    progress: bool = True,
    desc: str = "embedding",
) -> np.ndarray:
    """Embeddings (n, D) float32 of every (texts[i], images[i]), `batch_size` at a time.

    encode_fn(texts, images) -> (len(texts), D) tensor or array (e.g. `LmmEmbedder.encode`); it
    runs under torch.no_grad(). images: per item a PIL image, None (no image; None for all:
    text-only data), or a path, opened (`data.load_image`) when its batch is encoded.
    With `cache_dir`, the result is stored in cache_dir/embeddings-<hash>.npz keyed by `cache_key`
    (identify the model, e.g. `model_fingerprint(model)`) and `data_fingerprint(texts, images)`;
    a later call with the same key and data loads it without calling encode_fn.
    """
    images = [None] * len(texts) if images is None else images
    if len(texts) == 0 or len(texts) != len(images):
        raise ValueError(f"need as many images as texts (> 0), got {len(texts)} and {len(images)}")
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if cache_dir is None:
        return _encode_all(encode_fn, texts, images, batch_size, progress, desc)
    if not cache_key:
        raise ValueError("cache_dir needs a cache_key identifying the model, "
                         "e.g. model_fingerprint(model)")
    fingerprint = data_fingerprint(texts, images)
    path = _cache_path(cache_dir, cache_key, fingerprint)
    if path.exists():
        return _load_cached(path, cache_key, fingerprint, len(texts))
    embeddings = _encode_all(encode_fn, texts, images, batch_size, progress, desc)
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        np.savez(file, embeddings=embeddings, cache_key=np.array(cache_key),
                 data_fingerprint=np.array(fingerprint))
    return embeddings


# --------------------------------------------------------------------------------------------------
# MMEB eval sets


@dataclass(frozen=True)
class EvalLists:
    """An eval set as queries and distinct candidates, images not decoded yet (step 1, module doc).

    query_texts, query_images (Q,); candidate_texts, candidate_images (N,): each distinct
    candidate once; index (Q, C): query i's list is candidates index[i], its positive first. An
    image is None, a path (records: image_root / the record's path) or a PIL image (in memory).
    """

    query_texts: list[str]
    query_images: list
    candidate_texts: list[str]
    candidate_images: list
    index: np.ndarray


def read_eval_lists(eval_set, image_root=None) -> EvalLists:
    """The queries and distinct candidates of an eval set, with each list's index into them.

    eval_set: path of an MMEB eval .jsonl/.parquet (read as `data.EvalDataset(eval_set,
    image_root, check_images=False)`: image_root None means its default), an `EvalDataset`, or a
    sequence of its items (query_text, query_image, candidate_texts, candidate_images; candidate
    0 the positive). From records, candidates are the same when their texts and image files'
    bytes are (each distinct path read once, no image decoded); in-memory items are compared by
    text and pixels.
    """
    if isinstance(eval_set, (str, os.PathLike)):
        eval_set = EvalDataset(eval_set, image_root, check_images=False)
    if isinstance(eval_set, EvalDataset):
        return _lists_of_records(eval_set)
    return _lists_of_items(eval_set)


def _number_distinct(keys_per_list: Iterable[list]) -> tuple[dict, np.ndarray]:
    """Each distinct key's number in first-seen order, and every list's numbers (Q, C)."""
    number_of: dict = {}
    index = [[number_of.setdefault(key, len(number_of)) for key in keys] for keys in keys_per_list]
    return number_of, np.array(index, dtype=np.int64)


def _lists_of_records(dataset: EvalDataset) -> EvalLists:
    n_candidates = len(dataset.rows[0][1]["tgt_text"])

    digests: dict[str, bytes] = {}  # relative path -> digest of the file's bytes
    first_path: dict[tuple[str, bytes], str] = {}  # a candidate key -> the first path seen

    def image(path):
        return dataset.image_root / path if path else None

    def key(where: str, text: str | None, path: str | None) -> tuple[str, bytes]:
        if path and path not in digests:
            digests[path] = _file_digest(image(path), where)
        content = digests[path] if path else b""
        first_path.setdefault((text or "", content), path or "")
        return text or "", content

    def candidate_keys():  # (text, image content) of each candidate, list by list
        for where, record in dataset.rows:
            if len(record["tgt_text"]) != n_candidates:
                raise ValueError(f"{where}: {len(record['tgt_text'])} candidates, the first list "
                                 f"has {n_candidates}; lists must have equal length")
            yield [key(where, text, path)
                   for text, path in zip(record["tgt_text"], record["tgt_img_path"])]

    number_of, index = _number_distinct(candidate_keys())
    records = dataset.records
    return EvalLists([record["qry_text"] or "" for record in records],
                     [image(record["qry_img_path"]) for record in records],
                     [text for text, _ in number_of],
                     [image(first_path[candidate]) for candidate in number_of], index)


def _file_digest(path: Path, where: str) -> bytes:
    """sha256 of a file's bytes; FileNotFoundError naming the record (`where`) and the path."""
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: image not found: {path}") from None


def _lists_of_items(items) -> EvalLists:
    query_texts, query_images, keys, first_image = [], [], [], {}
    for i in range(len(items)):
        item = items[i]
        missing = {"query_text", "query_image", "candidate_texts", "candidate_images"} - set(item)
        if missing:
            raise ValueError(f"eval item {i} lacks {sorted(missing)}")
        texts, images = item["candidate_texts"], item["candidate_images"]
        if len(texts) != len(images):
            raise ValueError(f"eval item {i}: {len(texts)} candidate texts but {len(images)} "
                             f"candidate images")
        if keys and len(texts) != len(keys[0]):
            raise ValueError(f"eval item {i} has {len(texts)} candidates, item 0 has "
                             f"{len(keys[0])}; lists must have equal length")
        query_texts.append(item["query_text"])
        query_images.append(item["query_image"])
        keys.append([(text, _image_digest(image)) for text, image in zip(texts, images)])
        for key, image in zip(keys[-1], images):
            first_image.setdefault(key, image)
    if not query_texts:
        raise ValueError("the eval set is empty")
    number_of, index = _number_distinct(keys)  # numbered in first_image's order
    return EvalLists(query_texts, query_images, [text for text, _ in number_of],
                     list(first_image.values()), index)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """Dropout and similar layers off while embedding; the previous mode restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@dataclass(frozen=True)
class EmbeddedLists:
    """An embedded eval set (step 2, module doc): queries (Q, D), each distinct candidate once
    (N, D), float32, and index (Q, C): query i's list is candidates[index[i]], its positive first.
    """

    queries: np.ndarray
    candidates: np.ndarray
    index: np.ndarray

    def candidate_lists(self) -> np.ndarray:
        """Every list spelled out, (Q, C, D): Q * C * D floats, so for small eval sets only."""
        return self.candidates[self.index]


def embed_eval_lists(
    embedder: Embedder, eval_set, image_root=None, *, batch_size: int = 32, cache_dir=None,
    model_key: str | None = None, progress: bool = True,
) -> EmbeddedLists:
    """Embed an eval set's queries and distinct candidates, `batch_size` items at a time.

    eval_set: an `EvalLists`, or what `read_eval_lists(eval_set, image_root)` reads. The embedder
    runs in eval mode; queries go through its `encode_queries` and candidates through
    `encode_targets`, the sides training embeds them with (`LmmEmbedder` adds its instructions
    there). Images are decoded a batch at a time (an image shared by several items is decoded
    again unless `data.IMAGE_CACHE` still holds it). cache_dir/model_key: see `embed_in_batches`
    (items read from records are fingerprinted by text, image path, file size and mtime, so a hit
    decodes nothing); model_key defaults to `model_fingerprint(embedder)`.
    """
    lists = eval_set if isinstance(eval_set, EvalLists) else read_eval_lists(eval_set, image_root)
    if cache_dir is not None and model_key is None:
        model_key = model_fingerprint(embedder)
    options = dict(batch_size=batch_size, cache_dir=cache_dir, cache_key=model_key,
                   progress=progress)
    with _eval_mode(embedder):
        queries = embed_in_batches(embedder.encode_queries, lists.query_texts, lists.query_images,
                                   desc="queries", **options)
        candidates = embed_in_batches(embedder.encode_targets, lists.candidate_texts,
                                      lists.candidate_images, desc="candidates", **options)
    return EmbeddedLists(queries, candidates, lists.index)


def embed_eval_dataset(
    embedder: Embedder, eval_dataset, batch_size: int = 32, cache_dir=None,
    model_key: str | None = None, progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Query embeddings (Q, D) and candidate lists spelled out (Q, C, D), float32.

    `embed_eval_lists`, then `EmbeddedLists.candidate_lists`: for small eval sets, where code
    wants each list as an array (per-query plots, hardest failures); large ones stay compact.
    """
    embedded = embed_eval_lists(embedder, eval_dataset, batch_size=batch_size,
                                cache_dir=cache_dir, model_key=model_key, progress=progress)
    return embedded.queries, embedded.candidate_lists()


@dataclass(frozen=True)
class ListScores:
    """Per-query results on candidate lists (candidate 0 the positive), from which the kit's
    tables, similarity pools and per-query samples are all read.

    ranks (Q,): the positive's rank in its list (under the tie rule it was scored with, module
    doc). stats: the Table-1 similarities (`analysis.similarity_stats`), None when the lists hold
    the positive alone.
    """

    ranks: np.ndarray
    stats: SimilarityStats | None
    n_candidates: int

    def metrics(self, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float | int]:
        """`ranking_metrics` (p@1, mrr, recall@k, ndcg@k), then `stats.as_dict()` (positive, hard,
        easy, gap, k, queries) when the lists have wrong candidates."""
        metrics = ranking_metrics(self.ranks, ks)
        if self.stats is not None:
            metrics.update(self.stats.as_dict())
        return metrics


def score_embedded_lists(embedded: EmbeddedLists, k: int = 5, ties: str = "pessimistic",
                         chunk_size: int = 256) -> ListScores:
    """Ranks (tie rule `ties`, module doc) and Table-1 similarities of an embedded eval set,
    candidate 0 the positive, a chunk of queries at a time (`analysis.indexed_similarity_chunks`).

    k (top-k hard, bottom-k easy negatives) is lowered to C - 1 for short lists.
    """
    check_tie_rule(ties)
    n_candidates = embedded.index.shape[1]
    ranks, stats = [], []
    for _, sims in indexed_similarity_chunks(embedded.queries, embedded.candidates,
                                             embedded.index, chunk_size):
        positives = np.zeros(len(sims), dtype=np.int64)
        ranks.append(ranks_from_similarities(sims, positives, ties))
        if n_candidates > 1:  # Table-1 statistics need at least one wrong candidate
            stats.append(stats_of_similarities(sims, positives, min(k, n_candidates - 1)))
    return ListScores(np.concatenate(ranks).astype(np.int64),
                      concatenate_stats(stats) if stats else None, n_candidates)


def score_candidate_lists(query_emb, cand_emb, k: int = 5, chunk_size: int = 256,
                          ties: str = "pessimistic") -> ListScores:
    """`score_embedded_lists` of lists given as one array: query_emb (Q, D), cand_emb (Q, C, D),
    candidate 0 the positive."""
    _check_lists(cand_emb)
    n_queries, n_candidates = np.shape(cand_emb)[:2]
    table = to_numpy(cand_emb).reshape(n_queries * n_candidates, -1)  # (Q * C, D), a view
    index = np.arange(n_queries * n_candidates).reshape(n_queries, n_candidates)
    return score_embedded_lists(EmbeddedLists(to_numpy(query_emb), table, index), k, ties,
                                chunk_size)


def score_eval_set(
    embedder: Embedder, eval_dataset, *, k: int = 5, ties: str = "pessimistic",
    batch_size: int = 32, cache_dir=None, model_key: str | None = None, chunk_size: int = 256,
    progress: bool = True, image_root=None,
) -> ListScores:
    """`embed_eval_lists`, then `score_embedded_lists`."""
    check_tie_rule(ties)  # before the embedding, which may take hours
    embedded = embed_eval_lists(embedder, eval_dataset, image_root, batch_size=batch_size,
                                cache_dir=cache_dir, model_key=model_key, progress=progress)
    return score_embedded_lists(embedded, k, ties, chunk_size)


def evaluate_eval_set(
    embedder: Embedder, eval_set, image_root=None, *, ks: Sequence[int] = (1, 5, 10), k: int = 5,
    ties: str = "pessimistic", batch_size: int = 32, cache_dir=None, chunk_size: int = 256,
    progress: bool = True,
) -> dict[str, float | int]:
    """Retrieval metrics and Table-1 similarity means for one MMEB eval file or data set.

    eval_set: as `read_eval_lists` takes it (a path of an MMEB eval .jsonl/.parquet, with
    image_root None meaning its default; an `EvalDataset`; a sequence of its items).
    Returns `ListScores.metrics` (p@1, recall@k, mrr, ndcg@k under the tie rule `ties`; positive,
    hard, easy, gap, k -- lowered to C - 1 for short lists) and the numbers of queries and
    candidates.
    """
    scores = score_eval_set(embedder, eval_set, k=k, ties=ties, batch_size=batch_size,
                            cache_dir=cache_dir, chunk_size=chunk_size, progress=progress,
                            image_root=image_root)
    return {**scores.metrics(ks), "queries": len(scores.ranks), "candidates": scores.n_candidates}
