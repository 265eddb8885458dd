"""The bundled demo model: `ldm-demo-shapes.safetensors`, trained by ldm itself on the procedural shapes set
(`ldm.data.shapes`; `make demo-model` retrains it). It ships inside the package, so an installed wheel has it, and
it is what `ldm txt2img` / `ldm img2img` use when no `--ckpt` is given."""
from pathlib import Path

DEMO_CHECKPOINT = Path(__file__).resolve().parent / "ldm-demo-shapes.safetensors"
