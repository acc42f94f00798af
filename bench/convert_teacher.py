"""A family-path teacher checkpoint (model cifar_resnetN, family shape) as the same network
through the traced mechanism (tasprune:cifar_resnetN): same module, same state dict; only the
meta's model name and shape change. Used to run the traced TAS arms on the before-teacher:

    python bench/convert_teacher.py bench/teachers/fmnist-r20.pt runs/teachers/fmnist-r20-traced.pt
"""

import sys
from pathlib import Path

from tasprune.checkpoint import load_checkpoint, save_checkpoint
from tasprune.models.traced import traced

src, dst = sys.argv[1:3]
payload = load_checkpoint(src)
meta = dict(payload["meta"])
name = "tasprune:" + meta["model"]
meta["model"] = name
meta["shape"] = traced(name).full_shape().to_dict()
Path(dst).parent.mkdir(parents=True, exist_ok=True)
save_checkpoint(dst, {"model": payload["model"], "meta": meta})
print("wrote", dst, name)
