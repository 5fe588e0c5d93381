"""The request channel: how a trigger file or a request file in the run directory becomes a claimed
request on rank 0, and how its receipt is written (storage helpers, the trigger, the channel, the
poller thread). Nothing here imports Ray or torch."""
