"""Using a trained adapter: the inference-model factory, gallery index and text search."""

from upperson.retrieval.factory import build_inference_model, inference_config
from upperson.retrieval.gallery import GalleryIndex, SearchHit, model_from_index

__all__ = ["GalleryIndex", "SearchHit", "build_inference_model", "inference_config", "model_from_index"]
