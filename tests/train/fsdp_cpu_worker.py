"""`codetune train` on Accelerate's FSDP2 path, on the CPU over gloo (a test helper, run under torchrun).

Accelerate only picks FSDP on GPUs (on the CPU a launched group is always DDP), so this sets the two
fields of its state that its FSDP2 path reads once the Accelerator exists; everything after that is the
real path: Accelerate's fsdp2 prepare of the loss function and optimizer, set_requires_gradient_sync
under no_sync, the DTensor-aware clipping, and train/distributed.py's gather, scatter and save."""

import sys

from accelerate.utils import DistributedType

from codetune.cli import main
from codetune.train import distributed


def fsdp_on_cpu(tcfg):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, device_placement=False)
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = distributed.fsdp_plugin()
    return acc


if __name__ == "__main__":
    distributed.make_accelerator = fsdp_on_cpu
    sys.exit(main(sys.argv[1:]))
