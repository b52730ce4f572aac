"""The one compiled part: the CPU LSTM kernel (encodec_jax/_lstm_cpu.cc, an XLA FFI custom call).

Everything else is declared in pyproject.toml. The extension is optional: where it does not
build (no C++ compiler), the package installs without it and the LSTM runs as a `lax.scan`.
"""

import jax.ffi
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "encodec_jax._lstm_cpu",
            ["encodec_jax/_lstm_cpu.cc"],
            include_dirs=[jax.ffi.include_dir()],
            language="c++",
            # Contracted multiply-adds are part of the kernel's arithmetic (see its header);
            # -Wno-psabi: the 64-byte vector type only crosses inlined calls.
            extra_compile_args=["-std=c++17", "-O3", "-ffp-contract=fast", "-Wno-psabi"],
            optional=True,
        )
    ]
)
