"""Install PIT.

The compiler stages live in top-level folders (``ir/``, ``schedules/``, ``codegen/``) as the
design card lays them out, but install under ``pit_compiler.`` so that generic names such as
``ir`` never shadow another project's packages.
"""

from setuptools import setup

STAGE_PACKAGES = {
    "pit_compiler.ir": "ir",
    "pit_compiler.schedules": "schedules",
    "pit_compiler.codegen": "codegen",
}

setup(
    name="pit-compiler",
    version="0.1.0",
    description="PIT: a sparse tensor compiler for PyTorch built on permutation-invariant transformation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "pit_compiler",
        "pit_compiler.runtime",
        "pit_compiler.nn",
        "pit_compiler.frontend",
        "pit_compiler.tuning",
        *STAGE_PACKAGES,
    ],
    package_dir={"pit_compiler": "pit_compiler", **STAGE_PACKAGES},
    install_requires=[
        "apache-tvm==0.27.0.post1",
        # 0.1.15.x segfaults in every IR serialization (and so in every tensorize): keep this pin.
        "apache-tvm-ffi==0.1.14.post1",
        "torch>=2.4",
        "numpy",
        "sympy",
    ],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={
        "console_scripts": ["pit=pit_compiler.__main__:main", "pit-tune=pit_compiler.cli:main"],
        "torch_dynamo_backends": ["pit = pit_compiler.backend:pit"],
    },
)
