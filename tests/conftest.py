"""Shared pytest setup.

Pre-imports the heavy torch / Lightning modules once in the pytest process, so ranks forked by
``tests.distributed.harness.run_ranks`` inherit them instead of importing them lazily (a first import
inside each rank costs seconds on small machines).
"""

from __future__ import annotations

import lightning  # noqa: F401
import torch  # noqa: F401
import torch._dynamo  # noqa: F401
import torch.distributed  # noqa: F401
import torch.distributed._composable  # noqa: F401  (composable activation checkpointing)
import torch.distributed._composable.replicate_with_fsdp  # noqa: F401  (ZeRO stage 0)
import torch.distributed.algorithms._checkpoint.checkpoint_wrapper  # noqa: F401
import torch.distributed.checkpoint  # noqa: F401
import torch.distributed.fsdp  # noqa: F401
import torch.distributed.tensor  # noqa: F401
import torch.distributed.tensor.parallel  # noqa: F401
