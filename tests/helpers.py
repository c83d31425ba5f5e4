"""Small test helpers shared by several test files."""


class StopAt:
    """An observer that asks the trainer to stop after a step, as SIGTERM would."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step

    def on_step(self, r):
        if r["step"] == self.step:
            self.trainer._stop_signal = "SIGTERM"

    def on_event(self, e):
        self.on_step(e)

    def on_end(self, s):
        pass
