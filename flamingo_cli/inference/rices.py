"""RICES: demonstrations ranked by how similar their image is to the query's.

The similarity vectors come from records that `flamingo encode` wrote: `pooled`, the mean of
the checkpoint encoder's features (beside them in their file), or `embedding`, a CLIP image
embedding (`encode --embedding`), which is what OpenFlamingo's RICES ranks by: open_clip's
encode_image, L2-normalised, ranked by cosine similarity, the top k reversed so the most
similar comes last.
"""
from __future__ import annotations

from typing import Any

from ..formats.artifacts import EMBEDDING, POOLED, ArtifactError, load_ref, make_ref, split_ref

VECTORS = ("embedding", "pooled")
# What `flamingo encode --embedding` names for OpenFlamingo's RICES tower (open_clip's ViT-L-14, openai).
ENCODE_EMBEDDING = "flamingo encode --embedding vit_large_patch14_clip_224.openai"


def rank(eligible: list[int], k: int, query_vector, support_vectors, n_support: int) -> list[int]:
    """The k of `eligible` (indices into the support set) most cosine-similar to the query, most
    similar last; ties go to the lower index."""
    import torch

    if query_vector is None or support_vectors is None:
        raise ValueError("rices needs query_vector and support_vectors")
    q = torch.as_tensor(query_vector, dtype=torch.float64)
    s = torch.as_tensor(support_vectors, dtype=torch.float64)
    if q.dim() != 1 or s.dim() != 2 or s.shape != (n_support, q.shape[0]):
        raise ValueError(
            f"rices needs query_vector (d,) and support_vectors ({n_support}, d), "
            f"got {tuple(q.shape)} and {tuple(s.shape)}"
        )
    similarity = torch.nn.functional.cosine_similarity(s, q.unsqueeze(0), dim=-1).tolist()
    best = sorted(eligible, key=lambda i: (-similarity[i], i))[:k]
    return best[::-1]


class RicesVectors:
    """Records' similarity vectors of one kind (VECTORS), checked to come from one encoder (or
    one embedding tower) across every record it is asked about. An embedding's frames are each
    L2-normalised, then averaged: an image's is its normalised embedding, as OpenFlamingo's."""

    def __init__(self, vectors: str = "pooled"):
        if vectors not in VECTORS:
            raise ValueError(f"unknown rices vectors {vectors!r} (expected one of {', '.join(VECTORS)})")
        self.vectors = vectors
        self.makers: set = set()

    def __call__(self, record: dict[str, Any]):
        if self.vectors == "pooled":
            ref = record.get("features")
            if not isinstance(ref, str):
                raise ArtifactError(f"{record.get('id', '<record>')}: --select rices needs a 'features' reference "
                                    "(run flamingo encode)")
            vector, meta = load_ref(make_ref(split_ref(ref)[0], POOLED))
            self._same_maker(ref, meta.get("encoder"), "features come from different encoders")
            return vector.float()
        ref = record.get(EMBEDDING)
        if not isinstance(ref, str):
            raise ArtifactError(f"{record.get('id', '<record>')}: no 'embedding' (the CLIP image embedding RICES "
                                f"ranks by): add it with `{ENCODE_EMBEDDING}`")
        frames, meta = load_ref(ref)
        if frames.ndim != 2 or not len(frames):
            raise ArtifactError(f"{ref}: an embedding must be (frames, dim), got {tuple(frames.shape)}")
        self._same_maker(ref, meta.get("embedding"), "embeddings come from different towers")
        frames = frames.float()
        return (frames / frames.norm(dim=-1, keepdim=True)).mean(dim=0)

    def _same_maker(self, ref: str, maker: str | None, problem: str) -> None:
        self.makers.add(maker)
        if len(self.makers) > 1:
            raise ArtifactError(f"{ref}: {problem} ({', '.join(sorted(map(str, self.makers)))})")

    def stack(self, records: list[dict[str, Any]]):
        import torch

        return torch.stack([self(r) for r in records])
