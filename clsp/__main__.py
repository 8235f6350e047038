"""`python -m clsp ...` (and `accelerate launch -m clsp ...`, `torchrun -m clsp ...`) runs the `clsp` command."""
from clsp.cli import app

app(prog_name="clsp")
