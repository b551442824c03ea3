"""``python -m resu.demo``: see :mod:`resu.demo.cli` for the arguments."""

from resu.demo.cli import main

main()
