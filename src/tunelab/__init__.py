"""tunelab: Hydra-composed fine-tuning of causal language models on PyTorch Lightning."""

import logging as _logging

__version__ = "0.1.0"

# PEFT imports bitsandbytes whenever it is installed (the dev and qlora extras); on CPUs with AVX512-BF16,
# bitsandbytes 0.50 then warns at import that the optional `kernels` package for its bf16 CPU inference kernel
# is missing. tunelab never uses that kernel (tunelab.models.qlora switches it off), so the line is noise.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

# `${tunelab.optimized_metric:}` in conf/train.yaml: registered wherever tunelab is imported (CLI, tests, plugins).
from tunelab.config.derived import register_resolvers as _register_resolvers  # noqa: E402

_register_resolvers()
