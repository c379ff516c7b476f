"""``python -m psframework.launch``: the same as the ``ps-launch`` console script."""

from .cli import main

main(prog_name="ps-launch")
