"""Test helpers shared by the resume tests."""

from composer import Callback


class CrashAt(Callback):
    """Simulates a killed job: raises once ``completed`` batches have run (and been checkpointed)."""

    def __init__(self, completed: int) -> None:
        self.completed = completed

    def batch_start(self, state, logger) -> None:
        if int(state.timestamp.batch) == self.completed:
            raise KeyboardInterrupt("simulated crash")
