"""Library notices that every run printed and that tell our users nothing, dropped by their exact text.

- transformers: "`CLIPImageProcessor` requires torchvision (not installed); falling back to
  `CLIPImageProcessorPil`": the project runs without torchvision on purpose, and the PIL image
  processors transformers falls back to are the ones it means to use.
- bitsandbytes: "Failed to load CPU gemm_4bit_forward from kernels-community": its 4-bit CPU kernels,
  which nothing here uses (peft and diffusers import bitsandbytes whenever it is installed).

Only these two messages are dropped; every other warning of these libraries still shows.
"""

import logging

KNOWN_NOTICES = {
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


class DropNotice(logging.Filter):
    """Drops the records of one logger whose message contains ``text``."""

    def __init__(self, text):
        super().__init__()
        self.text = text

    def filter(self, record):
        return self.text not in record.getMessage()


def drop_known_notices():
    """Install the filters (once per logger), before the libraries are imported."""
    for name, text in KNOWN_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNotice) for f in logger.filters):
            logger.addFilter(DropNotice(text))
