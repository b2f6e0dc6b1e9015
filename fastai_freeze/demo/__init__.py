"""The demo: embedded data and the pattern model, the strategy comparison, the command line.

Outside the library core: nothing in `fastai_freeze` imports this package.
"""

__all__: list[str] = []  # its modules are imported by name: demo.data, demo.comparison, demo.cli
