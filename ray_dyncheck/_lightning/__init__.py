"""Helpers of the Lightning adapter (:mod:`ray_dyncheck.lightning`): the checkpoint a ``Trainer`` resumes from."""
