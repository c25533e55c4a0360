"""jdit models: `build_model(name, **overrides)` and the token-mixer registry."""
import warnings

from jdit.models.mixers import MIXERS, register_mixer
from jdit.models.registry import MODELS, build_model, register_model
from jdit.models import dit  # registers the DiT family

__all__ = ["MIXERS", "MODELS", "build_model", "register_mixer",
           "register_model"]
from jdit.models import local_mixers  # registers local/window/kv_compress
from jdit.models import proxy_mixer  # registers proxy (PT-DiT)
from jdit.models import ssm_mixers  # registers linear and mamba
from jdit.models import families  # registers DiT-*-local, DiM-*, PT-DiT, ...
from jdit.models import moe, moe_models  # registers "moe" and DiT-MoE-*
from jdit.models import lamamba  # registers LaMamba-Diff-S, -B, -L, -XL
from jdit.models import lightningdit  # registers LightningDiT-*
from jdit.models.flops import flops  # noqa: E402  (the function, not module)

# `python -m jdit.models.flops` runs that module as __main__ after this
# package has imported it for the `flops` function above; runpy warns about
# the double import, which is harmless here (the CLI only reads the
# registries).
warnings.filterwarnings(
    "ignore", category=RuntimeWarning,
    message="'jdit.models.flops' found in sys.modules after import of package")
