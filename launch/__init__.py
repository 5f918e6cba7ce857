"""Training, planning, export and the command line: the floor that knows DeepSpeed."""
from .deepspeed_compat import default_to_cpu_accelerator

default_to_cpu_accelerator()
