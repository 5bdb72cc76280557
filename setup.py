# The C part of the shared-memory protocol (atomics, futex wait/wake); the rest
# of the build configuration is in pyproject.toml.
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "speedysvc._shmcore",
            sources=["speedysvc/_shmcore.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-missing-field-initializers"],
        )
    ]
)
