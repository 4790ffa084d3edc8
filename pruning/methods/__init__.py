"""Built-in pruning methods beyond ``none`` and ``litelvlm``; importing this package registers them."""
from pruning.methods import visionzip  # noqa: F401
from pruning.methods import vispruner  # noqa: F401
from pruning.methods import random_tokens  # noqa: F401
from pruning.methods import trim  # noqa: F401
from pruning.methods import prumerge  # noqa: F401
from pruning.methods import fastv  # noqa: F401
