"""p_tuning's run-time parts are shared by the prompt-learning methods (`peftctl.adapters.prompt`)."""

from peftctl.adapters.prompt import (  # noqa: F401 (found by the registry)
    before_inject,
    before_load,
    dispatch,
    model_tensors,
    training_hooks,
)
