"""The training engine's parts that `src/train.py` composes: EMA (`ema`), the checkpoint/resume protocol
(`checkpointing`) and the resumable data order (`loader`)."""


class TrainError(RuntimeError):
    """A training run that cannot go on; the message is one line naming the cause and the fix (train.py prints it
    as `train.py: <message>` and exits 1)."""
