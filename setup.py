"""Install reid_lite: `pip install -e .` (add `[test]` for the test suite)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# One version, in reid_lite/__init__.py (read as text: importing the package here would need its dependencies).
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "reid_lite" / "__init__.py").read_text(), re.M).group(1)
EXPORT = ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18", "openvino>=2024.4"]

# torchreid 0.2.5 (PyPI) declares no dependencies, yet `import torchreid` imports gdown, scipy (scipy.io for
# its dataset readers) and torch.utils.tensorboard (tensorboard): without them the adapter cannot import.
TORCHREID = ["torchreid==0.2.5", "gdown", "scipy>=1.7", "tensorboard"]

# reid_lite.video (camera video -> tracklets): ByteTrack from supervision 0.30.x (0.30 is the first without the GUI
# opencv-python requirement that would clash with opencv-python-headless; 0.31 dropped ByteTrack) and OpenVINO
# for the detector file (IR or ONNX).
VIDEO = ["supervision>=0.30,<0.31", "openvino>=2024.4"]

# The documentation site (mkdocs.yml): `mkdocs build --strict` in .ci/run. Material 9.x runs on MkDocs 1.x;
# mkdocstrings with its Python handler renders the API reference from the docstrings.
DOCS = ["mkdocs>=1.6,<2", "mkdocs-material>=9.5,<10", "mkdocstrings[python]>=0.26,<2"]

# PostgreSQL galleries (docs/postgres.md): psycopg 3 with its bundled libpq, and pgserver, which ships PostgreSQL 16
# with pgvector and starts a private server in a folder (the tests' server; `reid-gallery` needs only psycopg).
POSTGRES = ["psycopg[binary]>=3.1", "pgserver>=0.1.4"]

setup(
    name="reid_lite",
    version=VERSION,
    description="Person re-identification with a compressed TransReID (STM-ReID token merging)",
    license="Apache-2.0",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["reid_lite", "reid_lite.*"]),
    package_data={"reid_lite.index": ["web/*"]},  # the `reid-gallery serve` page
    python_requires=">=3.10",
    install_requires=[
        # torch/torchvision are pinned by the README's first install command (they come from the
        # machine's disk); here we only require them, so pip never swaps them for another build.
        "torch>=2.1",
        "torchvision>=0.16",
        "timm>=1.0",
        "yacs>=0.1.8",
        "pyyaml>=5.1",  # read before yacs: MERGE.PLUGINS of a config file
        "fvcore>=0.1.5.post20221221",
        "faiss-cpu>=1.8",
        # `reid-gallery serve`: the HTTP API (OpenAPI from FastAPI) and its server.
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "opencv-python-headless>=4.8",
        "pillow>=9.0",
        "numpy>=1.24",
        "tqdm>=4.60",
        "tensorboard>=2.10",  # torch.utils.tensorboard: training logs
        "matplotlib>=3.5",  # tools/reference_experiment.py's plots
        "scikit-learn>=1.2",  # tools/reference_experiment.py's precision-recall curve of the calibrated threshold
    ],
    extras_require={
        # ONNX export (torch's dynamo exporter needs onnxscript) and the CPU runtimes of MODEL.BACKEND.
        "export": EXPORT,
        # The test suite covers the torchreid adapter (the torchreid extra in full) and ONNX export.
        # requests: the server tests' client; playwright: drives the system's Chromium (.ci/run installs it)
        # for the web page's test, through executable_path (no browser download).
        "test": ["pytest>=7", "ruff>=0.5", "requests>=2.28", "playwright>=1.40", *TORCHREID, *EXPORT, *VIDEO,
                 *POSTGRES],
        # The site's toolchain (the README installs `.[test,docs]`; the tests themselves need none of it).
        "docs": DOCS,
        "torchreid": TORCHREID,
        "video": VIDEO,
        "postgres": POSTGRES,
        "gpu": ["faiss-gpu>=1.8"],
    },
    entry_points={
        "console_scripts": [
            "reid-gallery=reid_lite.video.cli:main",
        ]
    },
)
