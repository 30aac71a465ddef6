from setuptools import find_packages, setup

setup(
    name="dsunlearn",
    version="0.1.0",
    description="Machine unlearning for pre-trained LLMs at cluster scale, on DeepSpeed ZeRO-3",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dsunlearn", "dsunlearn.*"]),
    package_data={"dsunlearn": ["configs/*.json"]},
    install_requires=[
        "torch>=2.1",  # not pinned: GPU users bring their own CUDA build
        "deepspeed>=0.19,<0.20",
        "transformers>=5.0,<6",
        "accelerate>=1.0",  # transformers 5 needs it for HfDeepSpeedConfig (ZeRO-3 aware from_pretrained)
        "datasets>=3.0",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "tqdm",
        "numpy",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
        "scipy>=1.10",  # the KS test of TOFU's forget quality
        "rdata>=1.0",  # the demo world's R data sets (dsunlearn/demo/lazyload.py)
        "torchao>=0.14",  # the quantization audit's round-to-nearest weights (dsunlearn/eval/audit.py)
        "rouge-score>=0.1.2",  # VerbMem's ROUGE-L (dsunlearn/eval/generate.py), the package MUSE scores with
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "gguf>=0.10", "peft>=0.13"],
        "lora": ["peft>=0.13"],  # LoRA unlearning (adapter.rank > 0; dsunlearn/adapter.py)
        "mpi": ["mpi4py>=3.1"],
        "gguf": ["gguf>=0.10"],
        "lm_eval": ["lm-eval>=0.4"],
    },
    entry_points={"console_scripts": ["dsunlearn=dsunlearn.cli:entry"]},
)
