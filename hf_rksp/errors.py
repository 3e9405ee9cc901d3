"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class RKSPError(Exception):
    """An error the user can fix (bad input, missing model, not enough tokens...)."""


class NonFiniteActivationError(RKSPError):
    """NaN or inf appeared in the residual stream; ``block`` is the first block affected."""

    def __init__(self, block: int, where: str):
        self.block = block
        self.where = where
        super().__init__(
            f"non-finite values (NaN/inf) in the residual stream {where} block {block}; "
            "check the weights (or, in float16/bfloat16, retry with --dtype float32)"
        )
