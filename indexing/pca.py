"""PCA of local descriptors in DELF's order: L2-normalise, centre, project, optionally
whiten, L2-normalise again (delf-reference: 40-d, no whitening in DELF v1)."""

import io

import faiss
import numpy as np


def fit_pca(descriptors, dim, whiten=False):
    """PCA parameters from a sample [N, D] of descriptors (float32 or float16)."""
    x = l2_normalise(np.asarray(descriptors, np.float64))
    n, d = x.shape
    assert 0 < dim <= d, f"pca dim {dim} must be in 1..{d}"
    assert n > dim, f"need more than {dim} descriptors to fit PCA, got {n}"
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    order = np.argsort(eigenvalues)[::-1][:dim]
    # sign convention: largest component of each eigenvector positive, so refits agree
    components = eigenvectors[:, order].T
    components *= np.sign(components[np.arange(dim), np.abs(components).argmax(axis=1)])[:, None]
    return {
        "mean": mean.astype(np.float32),
        "components": components.astype(np.float32),  # [dim, D]
        "eigenvalues": eigenvalues[order].astype(np.float32),
        "whiten": bool(whiten),
        "explained_variance": float(eigenvalues[order].sum() / max(eigenvalues.sum(), 1e-12)),
    }


def apply_pca(descriptors, pca):
    """[N, D] -> [N, dim] float32, L2-normalised (fit and build; queries: apply_pca_in_faiss)."""
    x = l2_normalise(np.asarray(descriptors, np.float32))
    y = (x - pca["mean"]) @ pca["components"].T
    if pca["whiten"]:
        y /= np.sqrt(np.maximum(pca["eigenvalues"], 1e-12))
    return l2_normalise(y)


def apply_pca_in_faiss(descriptors, pca):
    """apply_pca for a query, its product in faiss (a LinearTransform). numpy's BLAS (OpenBLAS
    on pthreads in numpy's wheels) keeps its idle threads spinning for a while after a
    product; they held the second core while the faiss search that follows in a query ran on
    OpenMP threads, which then took up to 2x longer on 2 cores (faiss's own BLAS shares its
    OpenMP threads; benchmarks/README.md, "Synthetic scale"). The result differs from
    apply_pca in the last bits. fit and build keep apply_pca: k-means amplifies such bits into
    other codebooks (seed 0 of landmarks-dev moved by 0.006 mAP, measured), and the quality
    reported was measured with them."""
    x = l2_normalise(np.asarray(descriptors, np.float32))
    components = np.asarray(pca["components"], np.float32)
    if pca["whiten"]:
        components = components / np.sqrt(np.maximum(pca["eigenvalues"], 1e-12))[:, None]
    if not len(x):
        return np.zeros((0, len(components)), np.float32)
    # y = (x - mean) @ components.T = x @ components.T + b
    transform = faiss.LinearTransform(components.shape[1], len(components), True)
    faiss.copy_array_to_vector(np.ascontiguousarray(components).ravel(), transform.A)
    bias = -(components.astype(np.float64) * pca["mean"]).sum(axis=1)  # no BLAS call either
    faiss.copy_array_to_vector(bias.astype(np.float32), transform.b)
    transform.is_trained = True
    return l2_normalise(transform.apply(np.ascontiguousarray(x)))


def l2_normalise(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pca_to_bytes(pca):
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in pca.items()})
    return buf.getvalue()


def pca_from_bytes(data):
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        pca = {k: f[k] for k in f.files}
    pca["whiten"] = bool(pca["whiten"])
    pca["explained_variance"] = float(pca["explained_variance"])
    return pca
