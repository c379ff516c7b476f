"""``python -m launch``: the same as the ``ps-launch`` console script."""

from launch.cli import main

main(prog_name="ps-launch")
