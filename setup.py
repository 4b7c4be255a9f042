"""keras_localrank: local rank of neural-network layers for Keras 3."""

from setuptools import find_packages, setup

setup(
    name="keras_localrank",
    version="0.1.0",
    description=(
        "Local rank of Keras 3 layers: measure it, track it during training, "
        "relate it to the Information Bottleneck, and compress models with it."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(
        include=["keras_localrank", "keras_localrank.*", "compress", "compress.*"]
    ),
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.0",
        "tf-keras>=2.16",
        "tensorboard>=2.16",
        "tensorflow-probability>=0.24",
        "tensorflow-model-optimization>=0.8",
        "absl-py>=1.0",
        "numpy>=1.23",
        "pandas>=1.5",
        "matplotlib>=3.6",
        "scikit-learn>=1.1",
        "scipy>=1.9",
        "threadpoolctl>=3.1",
    ],
    extras_require={
        # Sweeps on Ray (--executor=ray); the in-process executor needs nothing.
        "ray": ["ray>=2.9"],
        "test": ["pytest>=7", "pytest-xdist>=3", "ruff>=0.4", "ray>=2.9"],
    },
)
