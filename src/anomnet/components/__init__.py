"""Building blocks shared by the detectors: patch features, k-means, coreset, nearest-neighbour search, blur.

A detector package holds only what is its own; anything two detectors need lives here.
"""

from anomnet.components.blur import blur_matrix, gaussian_blur
from anomnet.components.coreset import greedy_coreset, random_projection
from anomnet.components.features import PatchFeatures
from anomnet.components.kmeans import kmeans, nearest_centroid
from anomnet.components.nn_search import NearestNeighbors, faiss_available

__all__ = [
    "NearestNeighbors",
    "PatchFeatures",
    "blur_matrix",
    "faiss_available",
    "gaussian_blur",
    "greedy_coreset",
    "kmeans",
    "nearest_centroid",
    "random_projection",
]
