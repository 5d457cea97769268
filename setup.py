"""Install reid_lite: `pip install -e .` (add `[test]` for the test suite)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
EXPORT = ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18", "openvino>=2024.4"]

setup(
    name="reid_lite",
    version="0.1.0",
    description="Person re-identification with a compressed TransReID (STM-ReID token merging)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["reid_lite", "reid_lite.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch/torchvision are pinned by the README's first install command (they come from the
        # machine's disk); here we only require them, so pip never swaps them for another build.
        "torch>=2.1",
        "torchvision>=0.16",
        "timm>=1.0",
        "yacs>=0.1.8",
        "fvcore>=0.1.5.post20221221",
        "faiss-cpu>=1.8",
        "opencv-python-headless>=4.8",
        "pillow>=9.0",
        "numpy>=1.24",
        "tqdm>=4.60",
    ],
    extras_require={
        # ONNX export (torch's dynamo exporter needs onnxscript) and the CPU runtimes of MODEL.BACKEND.
        "export": EXPORT,
        "test": ["pytest>=7", "ruff>=0.5", "torchreid==0.2.5", "gdown", "tensorboard", *EXPORT],
        "torchreid": ["torchreid==0.2.5", "gdown", "tensorboard"],
        "gpu": ["faiss-gpu>=1.8"],
    },
    entry_points={
        "console_scripts": [
            "reid-gallery=reid_lite.index.cli:main",
        ]
    },
)
