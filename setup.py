# The C part of the shared-memory protocol and of the usual call's hot path: one
# extension, speedysvc._shmcore, built from the units in speedysvc/_c/ (core.h
# says what each holds); the rest of the build configuration is in pyproject.toml.
from glob import glob

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "speedysvc._shmcore",
            sources=sorted(glob("speedysvc/_c/*.c")),
            depends=sorted(glob("speedysvc/_c/*.h")),
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-missing-field-initializers"],
        )
    ]
)
