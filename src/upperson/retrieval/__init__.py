"""Using a trained adapter: the inference-model factory, gallery index and text search."""

from upperson.retrieval.gallery import GalleryIndex, SearchHit

__all__ = ["GalleryIndex", "SearchHit"]
