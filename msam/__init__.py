"""msam: Momentum-SAM and related optimizers (torch.optim style). Imports torch only."""

__all__: list[str] = []
