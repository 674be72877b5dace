"""Training cost counted in UNet work, not timed: the same count on any machine.

A UNet call on n images is n image-forwards. One with gradients (a training forward, whose backward
costs about twice the forward) counts 3 units per image, one without (the reference's forward, an
inversion step) 1 unit per image. Diffusion-DPO on B pairs is then 2B x 3 (policy) + 2B x 1
(reference) = 8B units per step; each no-grad inversion image-forward adds 1.

Used by the training loop (``unet_work`` and ``unet_work_total`` in metrics.jsonl) and by
benchmarks/step_cost.py.
"""

import torch

GRAD_FORWARD_UNITS = 3  # forward + backward
NO_GRAD_FORWARD_UNITS = 1


class UNetWork:
    """Counts the image-forwards of the given UNets (a forward pre-hook on each; a LoRA reference is the same
    module with its adapters off). ``forwards``: image-forwards; ``work``: UNet units (3 with gradients, 1
    without). :meth:`take` returns the counts since the last call and starts again from zero."""

    def __init__(self, *unets):
        self.forwards, self.work = 0, 0
        self.handles = [unet.register_forward_pre_hook(self._count, with_kwargs=True) for unet in unets
                        if unet is not None]

    def _count(self, module, inputs, kwargs):
        sample = inputs[0] if inputs else kwargs.get("sample", kwargs.get("hidden_states"))  # UNet / transformer
        n = sample.shape[0] if torch.is_tensor(sample) else 1
        self.forwards += n
        self.work += n * (GRAD_FORWARD_UNITS if torch.is_grad_enabled() else NO_GRAD_FORWARD_UNITS)

    def take(self):
        """(image-forwards, UNet units) since the last take()."""
        counts = (self.forwards, self.work)
        self.forwards, self.work = 0, 0
        return counts

    def remove(self):
        for handle in self.handles:
            handle.remove()
