"""Packaging for lookalike.

The four code folders at the top of the repository (model/, pipeline/, index/,
serving/) are mapped into ONE import namespace, ``lookalike.<folder>``, with
``package_dir``. Packages are discovered with ``find_packages(include=...)`` so a
new sub-package is never silently left out of the sdist that Beam's
``--setup_file`` ships to remote workers (tests/test_packaging.py checks this).
"""

from setuptools import find_packages, setup

CODE_FOLDERS = ("model", "pipeline", "index", "serving")

folder_packages = find_packages(
    where=".", include=[p for folder in CODE_FOLDERS for p in (folder, f"{folder}.*")]
)

setup(
    name="lookalike",
    version="0.1.0",
    description="Visual similarity search: Flax Siamese embeddings, Beam indexing, ScaNN, FastAPI.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11,<3.12",
    packages=[f"lookalike.{p}" for p in folder_packages],
    package_dir={f"lookalike.{folder}": folder for folder in CODE_FOLDERS},
    package_data={"lookalike.serving": ["static/*"]},
    include_package_data=True,
    install_requires=[
        # Exact versions live in constraints.txt; these are the direct needs.
        "jax",
        "flax",
        "optax",
        "orbax-checkpoint",
        "scann",
        # scann 1.4.2 fails to import beside tensorflow 2.21 (undefined symbol);
        # TFDS needs tensorflow to encode and decode image features.
        "tensorflow-cpu>=2.20,<2.21",
        "tensorflow-datasets",
        "importlib_resources",  # TFDS needs it for builders defined outside a package
        "apache-beam",
        "fastapi",
        "fastapi-offline",  # Swagger UI files for /docs, served without a CDN (/redoc is off: it fetches a logo)
        "uvicorn",
        "httptools",  # uvicorn's fast HTTP parser (about 2x vector-query throughput)
        "uvloop",
        "python-multipart",
        "annotated-types",  # query parameter limits (pydantic's own dependency)
        "httpx",
        "pillow",
        "simplejpeg",
        "av",
        "pyarrow",
        "numpy",
        "scikit-learn",
        "matplotlib",
        "tqdm",
        "prometheus-client",
    ],
    extras_require={
        # `lookalike embed --runner dask --dask_client_address=HOST:PORT`
        "dask": ["dask[distributed]"],
        # benchmark peers of bench/index.py (hnswlib compiles from source: needs a C++ compiler)
        "bench": ["faiss-cpu", "hnswlib"],
        "test": ["pytest", "pytest-timeout", "build", "setuptools>=68", "wheel", "playwright", "dask[distributed]",
                 "schemathesis", "ruff"],
    },
    entry_points={"console_scripts": ["lookalike = lookalike.pipeline.cli:run"]},
)
