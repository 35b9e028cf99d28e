"""PCA of local descriptors in DELF's order: L2-normalise, centre, project, optionally
whiten, L2-normalise again (delf-reference: 40-d, no whitening in DELF v1)."""

import io

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
    """[N, D] -> [N, dim] float32, L2-normalised."""
    x = l2_normalise(np.asarray(descriptors, np.float32))
    y = (x - pca["mean"]) @ pca["components"].T
    if pca["whiten"]:
        y /= np.sqrt(np.maximum(pca["eigenvalues"], 1e-12))
    return l2_normalise(y)


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
