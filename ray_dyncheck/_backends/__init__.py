"""Backends: where checkpoints go and come from (the :class:`~ray_dyncheck._backends.base.Backend`
contract, Ray Train, and plain ``torch.distributed`` with a run directory)."""
