"""msjax: MetaStone-S1 reflective generative models in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "grain>=0.2.12",
    "tensorflow-datasets>=4.9.9",
    "array-record>=0.8",
    "ml-collections>=1.0",
    "absl-py>=2.1",
    "numpy>=2.0",
    "safetensors>=0.5",
    "tokenizers>=0.21",
    "Jinja2>=3.1.6",  # checkpoints' chat templates (msjax.templates)
    "pyarrow>=15",  # parquet data files (msjax.data.local_math)
    "math-verify>=0.7",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    "matplotlib>=3.9",
]
HF = ["torch==2.13.0", "transformers>=4.51"]
SERVE = ["fastapi>=0.115", "uvicorn>=0.30"]

setup(
    name="msjax",
    version="0.1.0",
    description="MetaStone-S1 reflective generative models (policy + SPRM head) in JAX/Flax",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["msjax", "msjax.*"]),
    install_requires=CORE,
    extras_require={
        # torch + transformers: reading score_module.pt, parity tests, benchmarks.
        "hf": HF,
        # msjax-serve: the original /generate and /score HTTP API.
        "serve": SERVE,
        "test": HF + SERVE + ["pytest>=8", "pytest-xdist>=3.6", "ruff>=0.8", "requests>=2.32"],
        # libtpu: run on TPU VMs, and AOT-compile for TPU topologies on a CPU host.
        "tpu": ["jax[tpu]>=0.10,<0.11"],
        "gpu": ["jax[cuda12]>=0.10,<0.11"],
    },
    entry_points={
        "console_scripts": [
            "msjax-convert=msjax.cli.convert:run",
            "msjax-score=msjax.cli.score:run",
            "msjax-infer=msjax.cli.infer:run",
            "msjax-train=msjax.cli.train:run",
            "msjax-aot=msjax.cli.aot:run",
            "msjax-serve=msjax.cli.serve:run",
        ]
    },
)
