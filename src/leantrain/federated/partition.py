"""Deal the documents of a prepared token dataset to federated clients, and write each client's share.

A token dataset keeps document boundaries (every document ends with the end-of-text id) in corpus order,
and a corpus read from files keeps them in file order, so neighbouring documents share a source (the
same package, the same site). That order is the dataset's "natural" label:

    iid        documents shuffled and dealt round-robin: every client sees the same mix
    natural    contiguous runs of documents of about equal size: each client holds its own sources
    dirichlet  the documents are cut into `label_groups` contiguous source groups (the labels); each
               group is split among the clients in proportions drawn from Dir(alpha) (Hsu et al. 2019),
               so small alpha gives each client a few sources and large alpha approaches iid

Each client's share is written as a token dataset of its own (meta.json, tokenizer, train shards, the
shared validation split), so a client trains on it with the ordinary Trainer and nothing else; in a
real deployment that folder is the data that never leaves the client.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leantrain.errors import DataError
from leantrain.files import write_durable
from leantrain.tokens.dataset import META, ShardWriter, TokenDataset


@dataclass
class Documents:
    """Where each training document lies: (shard index, start, end) in token positions, end-of-text included."""

    shard: np.ndarray
    start: np.ndarray
    end: np.ndarray

    def __len__(self) -> int:
        return len(self.start)

    @property
    def tokens(self) -> np.ndarray:
        return self.end - self.start


def documents(ds: TokenDataset) -> Documents:
    """The training split's documents in corpus order (a shard end also ends a document: the loader never
    reads across one)."""
    shards, starts, ends = [], [], []
    for i, arr in enumerate(ds.shards("train")):
        cut = np.flatnonzero(np.asarray(arr) == ds.eot_id) + 1
        if len(cut) == 0 or cut[-1] != len(arr):
            cut = np.append(cut, len(arr))
        begin = np.concatenate([[0], cut[:-1]])
        keep = cut > begin
        shards.append(np.full(int(keep.sum()), i))
        starts.append(begin[keep])
        ends.append(cut[keep])
    return Documents(np.concatenate(shards), np.concatenate(starts), np.concatenate(ends))


def _contiguous_groups(tokens: np.ndarray, n: int) -> np.ndarray:
    """Group index of each document when corpus order is cut into `n` runs of about equal token mass."""
    mass = np.cumsum(tokens) - tokens / 2  # each document's middle, in tokens
    return np.minimum((mass * n / max(1, tokens.sum())).astype(np.int64), n - 1)


def assign(docs: Documents, clients: int, scheme: str, seed: int, alpha: float = 0.5,
           label_groups: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """(document indices of each client, label of each document) under `scheme` (iid, natural, dirichlet)."""
    rng = np.random.default_rng(seed)
    n = len(docs)
    groups = label_groups or max(10, 2 * clients)
    labels = _contiguous_groups(docs.tokens, groups)
    if scheme == "iid":
        order = rng.permutation(n)
        parts = [np.sort(order[k::clients]) for k in range(clients)]
    elif scheme == "natural":
        owner = _contiguous_groups(docs.tokens, clients)
        parts = [np.flatnonzero(owner == k) for k in range(clients)]
    elif scheme == "dirichlet":
        owned: list[list[int]] = [[] for _ in range(clients)]
        for g in range(groups):
            members = rng.permutation(np.flatnonzero(labels == g))
            p = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(members)).round().astype(int)
            for k, chunk in enumerate(np.split(members, cuts)):
                owned[k].extend(chunk.tolist())
        parts = [np.sort(np.asarray(o, dtype=np.int64)) for o in owned]
    else:
        raise DataError(f"federated.partition = {scheme!r} is not known; use iid, natural or dirichlet")
    return parts, labels


def skew(parts: list[np.ndarray], docs: Documents, labels: np.ndarray) -> dict[str, Any]:
    """Sizes and how far each client's label mix is from the whole (total variation distance, 0 = same mix,
    1 = disjoint), weighted by tokens."""
    tokens = docs.tokens
    n_labels = int(labels.max()) + 1 if len(labels) else 1
    whole = np.bincount(labels, weights=tokens, minlength=n_labels)
    whole = whole / max(1.0, whole.sum())
    clients = []
    for k, idx in enumerate(parts):
        mix = np.bincount(labels[idx], weights=tokens[idx], minlength=n_labels)
        total = mix.sum()
        tv = float(0.5 * np.abs(mix / total - whole).sum()) if total else None
        clients.append({"client": k, "documents": int(len(idx)), "tokens": int(total),
                        "labels": int((mix > 0).sum()), "label_tv_distance": None if tv is None else round(tv, 4)})
    sizes = np.array([c["tokens"] for c in clients], dtype=np.float64)
    tvs = [c["label_tv_distance"] for c in clients if c["label_tv_distance"] is not None]
    return {"clients": clients, "label_groups": n_labels,
            "size_cv": round(float(sizes.std() / sizes.mean()), 4) if sizes.mean() else None,
            "mean_label_tv_distance": round(float(np.mean(tvs)), 4) if tvs else None}


def write_partition(ds: TokenDataset, docs: Documents, idx: np.ndarray, out: Path) -> dict[str, Any]:
    """Write client documents `idx` as a token dataset in `out` (its validation split is the shared one, so
    client-side evaluation and the server's measure the same thing); returns its meta.json."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = ds.shards("train")
    with ShardWriter(tmp / "train", ds.dtype) as w:
        for i in idx:
            w.write(np.asarray(shards[docs.shard[i]][docs.start[i]:docs.end[i]]))
    with ShardWriter(tmp / "val", ds.dtype) as v:
        for arr in ds.shards("val"):
            v.write(np.asarray(arr))
    meta = json.loads(json.dumps(ds.meta))
    meta["splits"] = {
        "train": {"shards": [p.relative_to(tmp).as_posix() for p in w.close()], "tokens": w.tokens,
                  "documents": int(len(idx))},
        "val": {"shards": [p.relative_to(tmp).as_posix() for p in v.close()], "tokens": v.tokens,
                "documents": ds.meta["splits"]["val"].get("documents")},
    }
    meta["provenance"] = {**meta.get("provenance", {}), "federated_partition_of": str(ds.path.resolve())}
    for name in (ds.meta["tokenizer"], "tokenizer_config.json"):
        if (ds.path / name).is_file():
            shutil.copyfile(ds.path / name, tmp / name)
    write_durable(tmp / META, json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return meta


def make_partitions(data_path: str | Path, out_dir: str | Path, clients: int, scheme: str, seed: int,
                    alpha: float = 0.5, label_groups: int = 0, min_tokens: int = 1) -> dict[str, Any]:
    """Split `data_path` for `clients` clients into out_dir/client-K folders; returns the partition record
    (also written as out_dir/partitions.json). A client left with fewer than `min_tokens` (one training
    window) is a one-line DataError before anything is written."""
    ds = TokenDataset(data_path)
    if ds.masks("train") is not None:
        raise DataError(f"{data_path} is chat data (loss masks); federated partitions support plain token datasets "
                        "for now: prepare the data without --format chat")
    docs = documents(ds)
    parts, labels = assign(docs, clients, scheme, seed, alpha, label_groups)
    record = skew(parts, docs, labels)
    for c in record["clients"]:
        if c["tokens"] < min_tokens:
            hint = "raise federated.alpha or use partition = iid" if scheme == "dirichlet" else \
                "lower federated.clients or prepare more data"
            raise DataError(f"federated client {c['client']}'s partition holds {c['tokens']} training tokens "
                            f"({c['documents']} documents) but needs at least {min_tokens} (one window of "
                            f"model.seq_len + 1) to train; {hint}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for k, idx in enumerate(parts):
        write_partition(ds, docs, idx, out / f"client-{k}")
    record.update(scheme=scheme, alpha=alpha if scheme == "dirichlet" else None, seed=seed, data=str(data_path),
                  total_tokens=int(docs.tokens.sum()), total_documents=len(docs))
    write_durable(out / "partitions.json", json.dumps(record, indent=1) + "\n")
    return record
