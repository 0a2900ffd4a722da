"""Keep third-party chatter (progress bars, import warnings) out of the engine's own output.

The engine reports progress itself; transformers' per-shard bars and torchao's "failed to load"
notices (it probes for GPU kernels this machine cannot have) only bury the lines that matter.
"""
from __future__ import annotations

import logging


def quiet_transformers() -> None:
    """Call before importing transformers in-process."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
