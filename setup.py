"""asyncpatch_jax: AsyncPatch Diffusion (per-token noise levels) in JAX / Flax NNX."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements(name: str) -> list[str]:
  lines = (_HERE / name).read_text().splitlines()
  return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setuptools.setup(
    name="asyncpatch_jax",
    version="0.1.0",
    description="AsyncPatch Diffusion: spatially-flexible image generation, in JAX.",
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["asyncpatch_jax", "asyncpatch_jax.*"]),
    install_requires=_requirements("requirements.txt"),
    extras_require={
        "test": _requirements("requirements-test.txt"),
        # Accelerator builds of jax; install with the matching constraints, e.g.
        # pip install -e '.[cuda12]' -c constraints.txt
        "cuda12": ["jax[cuda12]==0.10.2"],
        "tpu": ["jax[tpu]==0.10.2"],
    },
)
